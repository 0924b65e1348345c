"""The compiled training step as a GPU run uses it (torch.compile forced on, on CPU): across disc_start in
both schedules, with EMA, validation and image logging, within a budget of compiled graphs per region."""

from __future__ import annotations

import copy
import csv
import logging
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from klvae.models.autoencoder import AutoencoderKL
from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args, train_losses

# Training-only graphs per region. encoder/decoder: the autoencoder update (grad) and the alternate
# schedule's no-grad reconstruction for the discriminator update; lpips: the input's branch (no grad
# needed) and the reconstruction's; discriminator: the generator update (frozen D, x̂ requires grad)
# and the discriminator update. Validation, the sanity check and log_images run eager.
GRAPH_BUDGET = {"encoder": 2, "decoder": 2, "lpips": 2, "discriminator": 2}
_GRAPH_LOG = re.compile(r"torch\.compile: graph (\d+) of region (\w+)")


def graphs_per_region(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in caplog.records:
        match = _GRAPH_LOG.search(record.getMessage())
        if match:
            counts[match[2]] = max(counts.get(match[2], 0), int(match[1]))
    return counts


def compiled_run(photos: Path, logdir: Path, schedule: str, backend: str) -> Path:
    torch._dynamo.reset()
    args = tiny_args(
        photos, logdir, "lightning.max_iterations=8", f"model.params.update_schedule={schedule}",
        "model.params.ema_decay=0.9", "model.params.lossconfig.params.perceptual_weight=0.5",
        "model.params.optimizations.compile=true", f"model.params.optimizations.compile_backend={backend}",
    )  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        torch._dynamo.reset()
    return only_run_dir(logdir)


def check_run(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    losses = train_losses(run)
    assert max(losses) == 8  # all iterations done: disc_start is 3 in the tiny config
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses.values())
    rows = [row for path in run.glob("csv/*/metrics.csv") for row in csv.DictReader(path.open())]
    assert [float(r["train/d_weight"]) for r in rows if r.get("train/d_weight")][-1] > 0  # GAN phase reached
    assert any(r.get("train/disc_loss") for r in rows) and any(r.get("val/rec_loss") for r in rows)
    assert list(run.glob("images/**/*.png")), "image logging ran"
    counts = graphs_per_region(caplog)
    assert set(counts) == set(GRAPH_BUDGET), counts  # every region really compiled (LPIPS' trunk too)
    assert all(counts[r] <= GRAPH_BUDGET[r] for r in counts), counts


@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_compiled_main_run_across_disc_start_stays_within_graph_budget(photos, tmp_path, caplog, schedule):
    caplog.set_level(logging.INFO, logger="klvae.perf.apply")
    check_run(compiled_run(photos, tmp_path / "logs", schedule, "aot_eager"), caplog)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_inductor_main_run_across_disc_start_stays_within_graph_budget(photos, tmp_path, caplog, schedule):
    caplog.set_level(logging.INFO, logger="klvae.perf.apply")
    check_run(compiled_run(photos, tmp_path / "logs", schedule, "inductor"), caplog)


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        keep = ("train/total_loss", "train/d_weight", "train/g_loss", "train/disc_loss", "train/p_loss")
        self.rows.append(
            {k: trainer.callback_metrics[k].item() for k in keep if k in trainer.callback_metrics}
        )


# every_batch has both updates in each GAN iteration; the alternate path runs in the main.py test above.
@pytest.mark.parametrize("schedule", ["every_batch", pytest.param("alternate", marks=pytest.mark.slow)])
def test_compiled_step_losses_equal_eager(tiny_ddconfig, tiny_lossconfig, schedule):
    tiny_lossconfig["params"]["disc_start"] = 1
    data = [
        {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        for i in range(4)
    ]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = AutoencoderKL(tiny_ddconfig, copy.deepcopy(tiny_lossconfig), embed_dim=4, learning_rate=1e-3,
                              update_schedule=schedule, ema_decay=0.9,
                              optimizations={"compile": compiled, "compile_backend": "aot_eager"})  # fmt: skip
        record = RecordLosses()
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[record])  # fmt: skip
        torch.manual_seed(1)
        trainer.fit(model, DataLoader(data, batch_size=None))
        runs.append(record.rows)
    torch._dynamo.reset()
    eager, compiled_rows = runs
    assert len(eager) == 4 and any("train/d_weight" in r and r["train/d_weight"] > 0 for r in eager)
    for a, b in zip(eager, compiled_rows, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)


class RecordShapes(pl.Callback):
    def __init__(self) -> None:
        self.shapes: set[tuple[int, ...]] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.shapes.add(tuple(batch["image"].shape))


# compile_dynamic: graphs symbolic in batch size, height and width. Per region the grad and no-grad
# variants, and each may be compiled once more when its first input is square (dynamo's duck sizing makes
# that graph assume H == W) or restarted: a budget that does not grow with the number of shapes.
DYNAMIC_GRAPH_BUDGET = {"encoder": 4, "decoder": 4, "lpips": 4, "discriminator": 4}


# ~30 CPU-s per region on the 2-core CI machine (dynamic-shape tracing); the default suite checks one
# region alone (tests/test_perf.py::test_compile_dynamic_compiles_a_bounded_number_of_graphs_for_many_bucket_shapes).
@pytest.mark.slow
def test_buckets_and_phases_compile_a_bounded_number_of_graphs_with_compile_dynamic(
    tiny_ddconfig, tiny_lossconfig, tmp_path, caplog
):
    regions = ("encoder", "decoder", "lpips", "discriminator")
    from klvae.data import ImageFolderDataModule
    from tests.data.test_folder_batches import many_shapes

    caplog.set_level(logging.INFO, logger="klvae.perf.apply")
    many_shapes(tmp_path / "imgs", n=24)
    # Buckets at 32² with batch 2, then at 48² with batch 3 (from iteration 5): 7 input shapes in the first
    # 12 iterations, across disc_start (2).
    data = ImageFolderDataModule(
        str(tmp_path / "imgs"), size=32, batch_size=2, buckets={"step": 8}, random_flip=True,
        phases=[{"iterations": 5, "size": 32}, {"size": 48, "batch_size": 3}],
    )  # fmt: skip
    torch._dynamo.reset()
    opts = {
        "compile": True,
        "compile_backend": "aot_eager",
        "compile_dynamic": True,
        "compile_regions": list(regions),
    }
    model = AutoencoderKL(tiny_ddconfig, tiny_lossconfig, embed_dim=4, learning_rate=1e-3, ema_decay=0.9,
                          optimizations=opts)  # fmt: skip
    shapes = RecordShapes()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=12, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[shapes])  # fmt: skip
    try:
        trainer.fit(model, datamodule=data)
        counts = model.graph_counts()
    finally:
        torch._dynamo.reset()
    assert len(shapes.shapes) >= 6 and model.iteration == 12, shapes.shapes  # more shapes than graphs
    assert set(counts) == set(regions), counts
    assert all(counts[r] <= DYNAMIC_GRAPH_BUDGET[r] for r in counts), (counts, shapes.shapes)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]  # never fell back to eager
