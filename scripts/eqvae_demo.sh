#!/usr/bin/env bash
# CPU demonstration of EQ-VAE fine-tuning (docs/eqvae.md): fine-tune the `make demo` VAE for the same number
# of iterations with and without the equivariance regulariser, then score both (and the starting point) on
# the held-out photos with klvae-eval --latent-metrics.
#   OMP_NUM_THREADS=1 python scripts/demo.py --workdir demo --max-iterations 300   # the base VAE
#   OMP_NUM_THREADS=1 bash scripts/eqvae_demo.sh demo 200                          # this script
set -euo pipefail
work=$(realpath "${1:-demo}")
iters=${2:-200}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
base=$(ls -d "$work"/logs/*_demo | tail -1)/checkpoints/last.ckpt
train="$work/shards/train-{000000..000002}.tar"
val="$work/shards/val-{000000..000001}.tar"
common=(-b "$repo/configs/demo.yaml" -t --no-test --logger csv -l "$work/eqvae_logs"
        "data.params.train.shards=$train" "data.params.validation.shards=$val"
        data.params.size=64 "model.params.ckpt_path=$base" "lightning.max_iterations=$iters"
        lightning.val_every_n_iterations=100000 lightning.image_logger.every_n_iterations=100000
        lightning.trainer.enable_progress_bar=false)
"$py" "$repo/main.py" "${common[@]}" -n plain
"$py" "$repo/main.py" "${common[@]}" -n eqvae model.params.equivariance.p=0.5 model.params.equivariance.p_small=0.25
for name in base plain eqvae; do
  if [ "$name" = base ]; then ckpt=$base; else ckpt=$(ls -d "$work"/eqvae_logs/*_"$name" | tail -1)/checkpoints/last.ckpt; fi
  "$py" -m klvae.evaluation.evaluate "$ckpt" --data "$val" --resolution 128 --batch-size 6 --inception none \
    --out "$work/eqvae_eval/$name" --latent-metrics
done
