"""DDP for the two-optimizer step (klvae.training.ddp): each update all-reduces only its own gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klvae.training.ddp import PerOptimizerDDPStrategy
from klvae.training.trainer import plan_trainer

PROBE = Path(__file__).with_name("ddp_probe.py")
REPO = Path(__file__).resolve().parents[2]


def run_probe(tmp_path: Path, *args: str) -> tuple[list[dict], list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("KLVAE_RUN_DIR", None)
    # Lightning relaunches the script for rank 1; a timeout turns a collective hang into a failure.
    subprocess.run([sys.executable, str(PROBE), str(tmp_path), *args], cwd=tmp_path, env=env,
                   check=True, timeout=240)  # fmt: skip
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return records, states


@pytest.mark.parametrize("schedule", ["every_batch", pytest.param("alternate", marks=pytest.mark.slow)])
def test_two_gloo_ranks_reduce_only_the_stepping_optimizers_gradients(tmp_path, schedule):
    ranks, states = run_probe(tmp_path, schedule)
    ae, disc = ranks[0]["numel"]["autoencoder"], ranks[0]["numel"]["discriminator"]
    # 8 images, batch 2, 2 ranks: 4 batches per rank; disc_start 2 (iterations 0, 1 autoencoder only).
    if schedule == "alternate":
        expected = [ae, ae, ae, disc]
    else:
        expected = [ae, ae, ae + disc, ae + disc]
    for record in ranks:
        assert record["per_batch"] == expected, (record, ae, disc)
        assert record["reduced_total"] == sum(expected)
    states = [s["model"] for s in states]
    # Different initialisations and different data per rank, identical weights after training. BatchNorm
    # running statistics stay per rank (as DDP with broadcast_buffers=False; rank 0's are checkpointed).
    local = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in states[0] if not k.endswith(local)]
    assert len(weights) > 100
    for key in weights:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("schedule", ["every_batch", pytest.param("alternate", marks=pytest.mark.slow)])
def test_a_fault_on_one_rank_in_one_optimizer_mid_round_keeps_the_ranks_identical(tmp_path, schedule):
    """16-mixed (real GradScaler, fused Adam), accumulation, EMA, ActNorm: NaN autoencoder loss (finite
    gradients) on rank 1 only, NaN discriminator gradients on rank 0 only (ddp_probe.py ``faults``)."""
    ranks, states = run_probe(tmp_path, schedule, "faults")
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 5  # 10 batches per rank, 2 per round
    assert ranks[1]["injected"] == [["ae", 2, 0]] and ranks[0]["injected"] == [["disc", 3, 1]]
    # One decision for both ranks: the autoencoder update of round 2 and the discriminator update of round
    # 3 were skipped everywhere, and only those.
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"]
    assert ranks[0]["nonfinite"]["skipped"] == [1, 1]
    # Every tensor is identical across ranks: weights, EMA, ActNorm's data-dependent init, Adam states.
    model = [s["model"] for s in states]
    assert len(model[0]) > 100 and any(".loc" in k for k in model[0])
    for key in model[0]:
        assert torch.equal(model[0][key], model[1][key]), key
    for opt0, opt1 in zip(states[0]["optimizers"], states[1]["optimizers"], strict=True):
        for index, state in opt0.items():
            for name, value in state.items():
                assert torch.equal(value, opt1[index][name]), (index, name)


def test_vf_loss_dino_discriminator_and_lecam_keep_the_ranks_identical(tmp_path):
    """Every tensor identical on both ranks after training with the VF term (its projection trains with the
    autoencoder's all-reduce; its adaptive weight is averaged), the DINO discriminator's heads, LeCam's anchors
    and lazy R1, through disc_start."""
    ranks, states = run_probe(tmp_path, "every_batch", "vf")
    assert ranks[0]["numel"]["vf_projection"] > 0
    model = [s["model"] for s in states]
    assert {
        "loss.terms.vf.linear_proj.weight",
        "loss.lecam.ema_real",
        "loss.terms.vf.adaptive_weight",
    } <= set(model[0])
    for key in model[0]:
        assert torch.equal(model[0][key], model[1][key]), key
    assert bool(model[0]["loss.lecam.initialized"])


def test_multi_device_plan_uses_the_per_optimizer_strategy():
    plan = plan_trainer({"trainer": {"devices": 2, "strategy": "ddp"}}, None, None, None, 1)
    assert isinstance(plan.trainer_kwargs["strategy"], PerOptimizerDDPStrategy)
