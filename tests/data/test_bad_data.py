"""Corrupt, truncated, image-less and too-small samples and truncated tars: skipped, counted, logged."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from klvae.data import DataStatsCallback, WebDataModule
from klvae.data.stats import SKIP_KINDS
from tests.data.conftest import encode, img2dataset_sample, random_image, write_shard


@pytest.fixture
def bad_shard(tmp_path: Path) -> str:
    good = [img2dataset_sample(f"good{i}", i) for i in range(3)]
    jpeg = encode(random_image(9, 64, 64))
    samples = [
        good[0],
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2]},
        good[1],
        {"__key__": "garbage", "jpg": b"this is not an image"},
        {"__key__": "captiononly", "json": b"{}", "txt": b"no image here"},
        {"__key__": "tiny", "jpg": encode(random_image(1, 10, 10))},
        good[2],
    ]
    return str(write_shard(tmp_path / "bad-000000.tar", samples))


@pytest.fixture
def truncated_tar(tmp_path: Path) -> str:
    path = write_shard(tmp_path / "cut-000000.tar", [img2dataset_sample(f"cut{i}", i) for i in range(10)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return str(path)


def _params(**overrides) -> dict:
    params = dict(size=16, min_size=16, batch_size=2, num_workers=2, shuffle_buffer=0)
    params.update(overrides)
    return params


def test_bad_samples_are_skipped_and_counted_across_workers(
    bad_shard: str, truncated_tar: str, single_rank: None
) -> None:
    dm = WebDataModule(validation={"shards": [bad_shard, truncated_tar]}, **_params())
    skipped, keys = collections.Counter(), []
    for batch in dm.val_dataloader():
        skipped.update(batch["_skipped"])
        keys += batch["__key__"]
        assert batch["image"].shape[1:] == (3, 16, 16)
    assert {k for k in keys if k.startswith("good")} == {"good0", "good1", "good2"}
    assert 0 < sum(k.startswith("cut") for k in keys) < 10  # the samples before the cut are kept
    assert skipped["corrupt_image"] == 2 and skipped["missing_image"] == 1 and skipped["too_small"] == 1
    assert skipped["read_error"] >= 1
    assert set(skipped) == set(SKIP_KINDS)


def test_unreadable_shard_in_training_does_not_stop_the_epoch(
    bad_shard: str, truncated_tar: str, single_rank: None
) -> None:
    dm = WebDataModule(train={"shards": [bad_shard, truncated_tar], "epoch_length": 20}, **_params())
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    total = collections.Counter()
    for batch in batches:
        total.update(batch["_skipped"])
    assert total["corrupt_image"] > 0 and total["read_error"] > 0


class _TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 3, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert "_skipped" not in batch  # the callback strips it before the model sees the batch
        return self.layer(batch["image"]).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        assert "_skipped" not in batch
        self.log("val/loss", self.layer(batch["image"]).pow(2).mean(), batch_size=batch["image"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_logs_skip_counts_as_metrics(bad_shard: str, tmp_path: Path) -> None:
    dm = WebDataModule(
        train={"shards": bad_shard, "epoch_length": 12},
        validation={"shards": bad_shard},
        **_params(num_workers=0),
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[DataStatsCallback()],
        default_root_dir=tmp_path,
    )
    trainer.fit(_TinyModel(), datamodule=dm)
    metrics = trainer.callback_metrics
    assert metrics["data/val_skipped_corrupt_image"] == 2 and metrics["data/val_skipped_missing_image"] == 1
    assert metrics["data/val_skipped_too_small"] == 1 and metrics["data/val_skipped_read_error"] == 0
    # 12 good training samples = 4 passes over the shard's 3 good ones: at least 3 passes' worth of skips.
    assert metrics["data/skipped_corrupt_image"] >= 6
    assert metrics["data/skipped_total"] >= 12


def test_tar_cut_inside_a_member_header_is_counted(tmp_path) -> None:
    import tarfile

    from klvae.data.sharding import ShardAssignment
    from klvae.data.stats import SkipCounter
    from klvae.data.streams import read_shard
    from tests.data.conftest import encode, random_image, write_shard

    path = write_shard(
        tmp_path / "a.tar", [{"__key__": f"{i}", "jpg": encode(random_image(i))} for i in range(4)]
    )
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: third + 100])  # 100 bytes into the third member's header
    counter = SkipCounter()
    assert len(list(read_shard(str(cut), ShardAssignment((str(cut),)), counter))) == 2
    assert counter.total["read_error"] == 1
