"""Shard writer: images in = samples out, deterministic split, resize, pass-through, CLI."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klvae.data import WebDataModule, write_shards
from klvae.data.make_shards import is_validation, main
from klvae.data.sample_images import skimage_photo_paths
from tests.data.conftest import encode, random_image


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """11 images in nested folders (JPEG, PNG, greyscale PNG) and one corrupt file."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(5):
        (root / f"photo{i}.jpg").write_bytes(encode(random_image(i, 48, 64)))
    for i in range(4):
        (root / "sub" / f"drawing{i}.png").write_bytes(encode(random_image(10 + i, 70, 50), "PNG"))
    for i in range(2):
        (root / "sub" / "deeper" / f"grey{i}.PNG").write_bytes(
            encode(np.full((40, 40), 9 * i, np.uint8), "PNG")
        )
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _read_all(shards: list[str]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(f"{shard}:{key}", {})[ext] = tar.extractfile(member).read()
    return samples


def test_round_trip_images_in_equal_samples_out(image_tree: Path, tmp_path: Path) -> None:
    summary = write_shards(
        [image_tree], tmp_path / "out", samples_per_shard=4, val_fraction=0.3, progress=False
    )
    assert summary.count["train"] + summary.count["val"] == 11
    assert [Path(p).name for p, _ in summary.skipped] == ["broken.jpg"]
    samples = _read_all(summary.shards["train"] + summary.shards["val"])
    assert len(samples) == 11 and all(set(s) == {"jpg", "json"} for s in samples.values())
    sources = {json.loads(s["json"])["source"] for s in samples.values()}
    assert len(sources) == 11
    assert all(Image.open(io.BytesIO(s["jpg"])).mode == "RGB" for s in samples.values())
    assert summary.bytes == sum(len(s["jpg"]) for s in samples.values())
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["count"] == summary.count
    # The written patterns feed the DataModule directly.
    dm = WebDataModule(
        validation={"shards": summary.patterns["train"]}, size=16, batch_size=32, num_workers=0
    )
    (batch,) = list(dm.val_dataloader())
    assert batch["image"].shape == (summary.count["train"], 3, 16, 16)


def test_shards_hold_n_samples_each(image_tree: Path, tmp_path: Path) -> None:
    summary = write_shards([image_tree], tmp_path / "out", samples_per_shard=4, progress=False)
    sizes = [len(_read_all([s])) for s in summary.shards["train"]]
    assert sizes == [4, 4, 3] and summary.patterns["train"].endswith("train-{000000..000002}.tar")


def test_split_is_deterministic_and_order_independent(image_tree: Path, tmp_path: Path) -> None:
    files = sorted(str(p) for p in image_tree.rglob("*.*"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(reversed(files)))
    one = write_shards([image_tree], tmp_path / "a", val_fraction=0.5, progress=False)
    two = write_shards([image_tree], tmp_path / "b", val_fraction=0.5, progress=False, workers=2)
    val = lambda s: sorted(json.loads(x["json"])["source"] for x in _read_all(s.shards["val"]).values())  # noqa: E731
    assert val(one) == val(two) and 0 < one.count["val"] < 11
    assert is_validation("a/b.jpg", 0.5, 0) == is_validation("a/b.jpg", 0.5, 0)
    from_list = write_shards([listing], tmp_path / "c", progress=False)
    assert from_list.count["train"] == 11 and len(from_list.skipped) == 1


def test_resize_shrinks_shorter_side_and_plain_jpegs_pass_through(image_tree: Path, tmp_path: Path) -> None:
    resized = write_shards([image_tree], tmp_path / "r", resize=32, progress=False)
    metas = [json.loads(s["json"]) for s in _read_all(resized.shards["train"]).values()]
    assert all(min(m["width"], m["height"]) == 32 for m in metas)
    kept = write_shards([image_tree / "photo0.jpg"], tmp_path / "k", progress=False)
    (sample,) = _read_all(kept.shards["train"]).values()
    assert sample["jpg"] == (image_tree / "photo0.jpg").read_bytes()


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([tmp_path], tmp_path / "o", samples_per_shard=0)
    with pytest.raises(ValueError, match="neither a folder"):
        write_shards([tmp_path / "missing"], tmp_path / "o")


def test_cli_writes_skimage_photos(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["--skimage-photos", "--out", str(out), "--samples-per-shard", "5", "--resize", "64"]
    with caplog.at_level(logging.INFO, logger="klvae.data.make_shards"):
        main([*args, "--val-fraction", "0.25", "--workers", "1", "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"]["train"] + summary["count"]["val"] == len(skimage_photo_paths())
    assert not summary["skipped"] and "train shards:" in caplog.text


def test_cli_rejects_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
