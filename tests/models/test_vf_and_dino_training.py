"""The 2025 recipe's pieces in real training through main.py: VA-VAE's VF loss (adaptive weight, two-pass
backward), the DINO-feature discriminator, LeCam and lazy R1 together, across disc_start, compiled and eager,
bf16, with EMA, validation and image logging; the projection and LeCam's anchors in the checkpoint; exact
resume; both on 2 DDP ranks."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from klvae.training.cli import main
from tests.cli_helpers import TINY, only_run_dir, tiny_args, train_losses, write_photos
from tests.conftest import tiny_backbone_config
from tests.models.test_compiled_training import graphs_per_region


def recipe(tmp_path: Path) -> Path:
    """The tiny config with the VF term, the DINO discriminator, LeCam and R1 (tiny random ViTs)."""
    config = OmegaConf.load(TINY)
    loss = config.model.params.lossconfig.params
    loss.disc_num_layers, loss.disc_ndf = 3, 64  # the PatchGAN's shape keys back at their defaults
    loss.perceptual_weight = 0.5
    loss.lecam_weight, loss.r1_gamma, loss.r1_interval = 0.1, 1.0, 2
    loss.discriminator_config = {
        "target": "klvae.modules.dino_discriminator.DinoDiscriminator",
        "params": {"backbone": tiny_backbone_config("vit_small_patch16_224.dino"), "blocks": [1, 3, -1]},
    }
    loss.terms = {
        "vf": {
            "target": "klvae.modules.vf_loss.VFLoss",
            "params": {"latent_channels": 4, "weight": 0.1, "adaptive": True, "cos_margin": 0.5,
                       "distmat_margin": 0.25, "backbone": tiny_backbone_config()},
        }
    }  # fmt: skip
    path = tmp_path / "vf_dino.yaml"
    OmegaConf.save(config, path)
    return path


def rows(run: Path) -> list[dict]:
    return [row for path in sorted(run.glob("csv/*/metrics.csv")) for row in csv.DictReader(path.open())]


def values(run: Path, key: str) -> list[float]:
    return [float(r[key]) for r in rows(run) if r.get(key)]


@pytest.mark.parametrize(
    "variant", ["eager", "compiled", "eqvae_accumulation", pytest.param("bf16", marks=pytest.mark.slow)]
)  # fmt: skip
def test_vf_loss_and_dino_discriminator_train_across_disc_start(photos, tmp_path, caplog, variant):
    caplog.set_level(logging.INFO)
    extra = ["model.params.ema_decay=0.9", "model.params.update_schedule=alternate"]
    if variant == "compiled":
        torch._dynamo.reset()
        extra += [
            "model.params.optimizations.compile=true",
            "model.params.optimizations.compile_backend=aot_eager",
        ]
    if variant == "bf16":
        extra += ["lightning.trainer.precision=bf16-mixed"]
    if (
        variant == "eqvae_accumulation"
    ):  # EQ-VAE's τ between the cut latent and the decoder, 2 batches a round
        extra = ["model.params.update_schedule=every_batch", "model.params.accumulate_grad_batches=2",
                 "model.params.equivariance={p: 0.5, p_small: 0.25, seed: 0}", "data.params.size=64"]  # fmt: skip
        photos = write_photos(tmp_path / "photos64", size=64)  # the low-resolution branch halves the side
    try:
        args = tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=8", *extra)
        args[1] = str(recipe(tmp_path))
        assert main(args) == 0
    finally:
        torch._dynamo.reset()
    run = only_run_dir(tmp_path / "logs")
    losses = train_losses(run)
    assert max(losses) == 8 and all(math.isfinite(v) for _, v in losses.values())
    # The adaptive VF weight is formed every autoencoder update (it moves), the VF parts are logged.
    vf_weights = values(run, "train/vf_weight")
    assert len(set(vf_weights)) > 1 and all(w > 0 and math.isfinite(w) for w in vf_weights)
    assert values(run, "train/vf_cos") and values(run, "val/vf_loss")
    # The GAN phase with the DINO discriminator: λ > 0, LeCam on every D update, R1 on every other one.
    assert values(run, "train/d_weight")[-1] > 0
    assert len(values(run, "train/lecam_loss")) == len(values(run, "train/disc_loss")) > 0
    assert 0 < len(values(run, "train/r1_loss")) < len(values(run, "train/disc_loss"))
    assert list(run.glob("images/**/*.png"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert "loss.terms.vf.linear_proj.weight" in state and "loss.terms.vf.adaptive_weight" in state
    assert "loss.lecam.ema_real" in state and any(k.startswith("loss.discriminator.heads.") for k in state)
    assert not any("backbone" in k for k in state)  # the frozen ViTs stay out of checkpoints
    if variant == "compiled":
        counts = graphs_per_region(caplog)
        # vf_backbone runs without grad only (one graph); the DINO discriminator: generator update and D
        # update (R1's forward runs eagerly); encoder/decoder/lpips as without the new pieces.
        assert set(counts) == {"encoder", "decoder", "lpips", "discriminator", "vf_backbone"}, counts
        assert all(n <= 2 for n in counts.values()), counts


def test_resume_with_vf_and_lecam_is_exact(photos, tmp_path):
    config = str(recipe(tmp_path))
    common = ["lightning.val_every_n_iterations=null", "lightning.image_logger.every_n_iterations=0",
              "lightning.checkpoint.save_top_k=0"]  # fmt: skip

    def args(logdir: str, iterations: int) -> list[str]:
        a = tiny_args(photos, tmp_path / logdir, *common, f"lightning.max_iterations={iterations}")
        a[1] = config
        return a

    assert main(args("full", 8)) == 0
    assert main(args("part", 5)) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=8"]) == 0
    full = torch.load(only_run_dir(tmp_path / "full") / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    f, r = train_losses(only_run_dir(tmp_path / "full")), train_losses(part)
    for it in range(6, 9):
        assert f[it][1] == pytest.approx(r[it][1], rel=1e-5, abs=1e-7), it
