"""The compiled training step with EQ-VAE's regulariser on: main.py across disc_start in both schedules,
with EMA, validation and image logging, within its own budget of compiled graphs per region.

Each transformed batch has another spatial size (24 scales, and the low-resolution branch resizes the
encoder's input too). Dynamo's automatic dynamic shapes compile a region once for the first size and, on
the first other size, once more with symbolic height/width that then serves every size: 2 graphs where the
plain step has 1 (measured with TORCH_LOGS=recompiles). Budget per region, against the plain step's
(tests/models/test_compiled_training.py): encoder/decoder (grad; no-grad reconstruction of the alternate
schedule) × (static, dynamic) = 4; discriminator (generator update, frozen D; discriminator update) ×
(static, dynamic) = 4; lpips (input branch without grad; reconstruction branch) × (static, dynamic, and
dynamic with the deepest VGG map 1 px wide: dynamo specialises size-1 dimensions) = 6. That last case needs
inputs under 32 px, so at 256² crops (inputs ≥ 64 px) LPIPS stays at 4. All below dynamo's recompile
limit (8) after which a region would silently run eager.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args, write_photos
from tests.models.test_compiled_training import graphs_per_region

EQ_GRAPH_BUDGET = {"encoder": 4, "decoder": 4, "lpips": 6, "discriminator": 4}


@pytest.fixture(scope="module")
def photos64(tmp_path_factory) -> Path:
    # 64² (latents 32² at the tiny config's f = 2): the smallest scale 8/32 still leaves LPIPS' VGG 16² input.
    return write_photos(tmp_path_factory.mktemp("photos64"), size=64)


# every_batch runs both updates (and λ) in every GAN iteration; the alternate schedule under -m slow.
@pytest.mark.parametrize("schedule", ["every_batch", pytest.param("alternate", marks=pytest.mark.slow)])
def test_compiled_eqvae_run_stays_within_its_graph_budget(photos64, tmp_path, caplog, schedule):
    caplog.set_level(logging.INFO, logger="klvae.perf.apply")
    torch._dynamo.reset()
    # Seeded draws (seed 0): τ at batches 0 and 3, the low-resolution branch at 5; the GAN from iteration 3.
    args = tiny_args(
        photos64, tmp_path / "logs", "lightning.max_iterations=6", f"model.params.update_schedule={schedule}",
        "data.params.size=64", "model.params.ema_decay=0.9", "model.params.lossconfig.params.perceptual_weight=0.5",
        "model.params.equivariance.p=0.5", "model.params.equivariance.p_small=0.25",
        "model.params.optimizations.compile=true", "model.params.optimizations.compile_backend=aot_eager",
    )  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        torch._dynamo.reset()
    run = only_run_dir(tmp_path / "logs")
    assert list(run.glob("images/**/*.png")) and list(run.glob("checkpoints/last.ckpt"))
    rows = [row for path in run.glob("csv/*/metrics.csv") for row in csv.DictReader(path.open())]
    assert {float(r["train/eq_branch"]) for r in rows if r.get("train/eq_branch")} == {0.0, 1.0, 2.0}
    assert [float(r["train/d_weight"]) for r in rows if r.get("train/d_weight")][-1] > 0  # GAN phase reached
    counts = graphs_per_region(caplog)
    logging.getLogger(__name__).warning("EQ-VAE compiled graphs (%s): %s", schedule, counts)
    assert set(counts) == set(EQ_GRAPH_BUDGET), counts
    assert all(counts[r] <= EQ_GRAPH_BUDGET[r] for r in counts), counts
