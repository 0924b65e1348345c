"""ImageFolderDataModule: same batch format as the shards; bad files replaced and counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klvae.data import ImageFolderDataModule
from tests.data.conftest import encode, random_image


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    train, val = tmp_path / "train", tmp_path / "val"
    (train / "nested").mkdir(parents=True)
    val.mkdir()
    for i in range(5):
        (train / "nested" / f"{i}.jpg").write_bytes(encode(random_image(i, 40, 56)))
    (train / "corrupt.png").write_bytes(b"\x89PNG broken")
    for i in range(3):
        (val / f"{i}.png").write_bytes(encode(random_image(20 + i, 30, 30), "PNG"))
    return train, val


def test_batches_match_the_webdataset_format(folders: tuple[Path, Path]) -> None:
    train, val = folders
    dm = ImageFolderDataModule(str(train), str(val), size=16, batch_size=3, random_flip=True)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 6 files, drop_last
    for batch in batches:
        assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert set(batch) == {"image", "__key__", "_skipped"}
    # The corrupt file was drawn once and replaced by a good one, keeping batches full.
    assert sum(b["_skipped"]["corrupt_image"] for b in batches) == 1
    assert "corrupt" not in {k for b in batches for k in b["__key__"]}


def test_validation_is_in_file_order_and_deterministic(folders: tuple[Path, Path]) -> None:
    train, val = folders
    dm = ImageFolderDataModule(str(train), str(val), size=16, batch_size=2, image_key="pixels")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [b["__key__"] for b in first] == [["0", "1"], ["2"]]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(first, second))


def test_without_val_dir_there_is_no_validation(folders: tuple[Path, Path]) -> None:
    assert ImageFolderDataModule(str(folders[0]), size=16, batch_size=2).val_dataloader() == []


def test_missing_or_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"), size=16).setup("fit")
    with pytest.raises(ValueError, match="holds no"):
        ImageFolderDataModule(str(tmp_path), size=16).setup("fit")
