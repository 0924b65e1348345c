"""Bucketed folder batches: one bucket and full per batch, ranks disjoint and equal, seeded, resumable."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from klvae.data import ImageFolderDataModule
from klvae.data.buckets import make_buckets, nearest_bucket
from klvae.errors import ConfigError, DataError
from tests.data.conftest import encode, random_image

# (height, width): square, 2:1 and 1:2, 4:3 and 3:4, beyond 2:1 (cropped to the widest bucket).
SHAPES = [(40, 40), (30, 60), (60, 30), (36, 48), (48, 36), (32, 70)]
BUCKETS = {"step": 8, "max_aspect": 2.0}


def many_shapes(folder: Path, n: int = 36) -> dict[str, tuple[int, int]]:
    """``n`` JPEGs of the six shapes; returns key -> (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i in range(n):
        height, width = SHAPES[i % len(SHAPES)]
        (folder / f"{i:02d}.jpg").write_bytes(encode(random_image(i, height, width)))
        sizes[f"{i:02d}"] = (width, height)
    return sizes


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_every_batch_is_full_one_bucket_and_each_image_is_in_its_nearest_bucket(tmp_path, single_rank):
    sizes = many_shapes(tmp_path / "imgs")
    module = ImageFolderDataModule(
        str(tmp_path / "imgs"), size=32, batch_size=3, buckets=BUCKETS, random_flip=True
    )
    buckets = make_buckets(32, 8, 2.0)
    batches = list(module.train_dataloader())
    assert len(batches) == len(module.train_dataloader()) > 0
    seen = collections.Counter()
    for batch in batches:
        n, c, h, w = batch["image"].shape
        assert (n, c) == (3, 3) and (h, w) in buckets  # full, and one shape per batch
        for key in batch["__key__"]:
            assert buckets[nearest_bucket(*sizes[key], buckets)] == (h, w), key
        seen.update(batch["__key__"])
    assert max(seen.values()) == 1  # an epoch is one pass: no image twice
    # Per bucket, only the incomplete last batch is dropped (at most batch_size - 1 images each).
    per_bucket = collections.Counter(buckets[nearest_bucket(*s, buckets)] for s in sizes.values())
    assert len(seen) == sum(n // 3 * 3 for n in per_bucket.values())
    assert "_phase" not in batches[0]  # no phases configured: the batch format is unchanged


def test_two_ranks_get_equal_counts_of_full_disjoint_batches_in_different_buckets(tmp_path, monkeypatch):
    many_shapes(tmp_path / "imgs")
    shapes, keys = {}, {}
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        module = ImageFolderDataModule(str(tmp_path / "imgs"), size=32, batch_size=2, buckets=BUCKETS, seed=3)
        batches = list(module.train_dataloader())
        shapes[rank] = [tuple(b["image"].shape) for b in batches]
        keys[rank] = {k for b in batches for k in b["__key__"]}
    assert len(shapes[0]) == len(shapes[1]) > 0 and all(s[0] == 2 for r in (0, 1) for s in shapes[r])
    assert not keys[0] & keys[1]
    # Ranks are not forced into the same bucket in a step (gradients are averaged per optimizer step).
    assert any(a != b for a, b in zip(shapes[0], shapes[1], strict=True))


def test_order_and_crops_are_functions_of_the_seed_and_epoch(tmp_path, single_rank):
    many_shapes(tmp_path / "imgs")

    def epochs(seed: int) -> list[list]:
        loader = ImageFolderDataModule(
            str(tmp_path / "imgs"), size=32, batch_size=3, buckets=BUCKETS, random_flip=True, seed=seed
        ).train_dataloader()
        return [[(b["__key__"], b["image"]) for b in loader] for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    for a, b in zip(first[0] + first[1], again[0] + again[1], strict=True):
        assert a[0] == b[0] and a[1].equal(b[1])
    assert [k for k, _ in first[0]] != [k for k, _ in first[1]]  # a new order each epoch (pass)
    assert [k for k, _ in first[0]] != [k for k, _ in other[0]]


def test_a_resumed_loader_continues_with_exactly_the_next_batch(tmp_path, single_rank):
    many_shapes(tmp_path / "imgs")
    module = ImageFolderDataModule(
        str(tmp_path / "imgs"), size=32, batch_size=3, buckets=BUCKETS, random_flip=True, num_workers=2
    )
    full = list(module.train_dataloader())
    resumed_loader = module.train_dataloader()
    resumed_loader.load_state_dict({"epoch": 0, "batches": 3, "format": 1})
    resumed = list(resumed_loader)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["__key__"] == b["__key__"] and a["image"].equal(b["image"])


def test_a_corrupt_file_is_counted_and_replaced_from_its_own_bucket(tmp_path, single_rank):
    sizes = many_shapes(tmp_path / "imgs", n=12)
    good = (tmp_path / "imgs" / "01.jpg").read_bytes()  # 60x30: the 40x24 bucket
    (tmp_path / "imgs" / "01.jpg").write_bytes(good[: len(good) // 3])  # header intact, data cut off
    module = ImageFolderDataModule(str(tmp_path / "imgs"), size=32, batch_size=2, buckets=BUCKETS)
    batches = [b for _ in range(3) for b in module.train_dataloader()]
    assert sum(b["_skipped"]["corrupt_image"] for b in batches) >= 1
    assert all("01" not in b["__key__"] for b in batches)
    for batch in batches:  # the replacement has the batch's shape: its image is of the same bucket
        assert {sizes[k][0] > sizes[k][1] for k in batch["__key__"]} == {
            batch["image"].shape[3] > batch["image"].shape[2]
        }


def test_validation_holds_each_image_once_in_its_bucket_in_file_order(tmp_path, single_rank):
    many_shapes(tmp_path / "imgs", n=14)
    module = ImageFolderDataModule(
        str(tmp_path / "imgs"), str(tmp_path / "imgs"), size=32, batch_size=4, buckets=BUCKETS
    )
    batches = list(module.val_dataloader())
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:02d}" for i in range(14)]
    for batch in batches:
        assert batch["__key__"] == sorted(batch["__key__"])
    again = list(module.val_dataloader())
    assert all(a["image"].equal(b["image"]) for a, b in zip(batches, again, strict=True))


def test_bucket_config_errors(tmp_path, single_rank):
    many_shapes(tmp_path / "imgs", n=4)
    with pytest.raises(ConfigError, match="drop_last: false cannot be combined with buckets"):
        ImageFolderDataModule(str(tmp_path / "imgs"), size=32, buckets=BUCKETS, drop_last=False)
    with pytest.raises(ConfigError, match="cannot be combined with buckets"):
        ImageFolderDataModule(str(tmp_path / "imgs"), size=32, resize_to=48, buckets=BUCKETS)
    with pytest.raises(
        DataError, match="phase 0 has fewer full batches of 3 images of one bucket than ranks"
    ):
        ImageFolderDataModule(str(tmp_path / "imgs"), size=32, batch_size=3, buckets=BUCKETS).setup("fit")


def test_two_gloo_ranks_train_on_full_bucketed_batches_and_switch_phase_together(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch

    repo = Path(__file__).resolve().parents[2]
    many_shapes(tmp_path / "imgs")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo / "src"), str(repo)]), OMP_NUM_THREADS="1")
    env.pop("KLVAE_RUN_DIR", None)
    # Lightning relaunches the script for rank 1; a timeout turns a collective hang into a failure.
    probe = Path(__file__).with_name("buckets_ddp_probe.py")
    subprocess.run([sys.executable, str(probe), str(tmp_path / "imgs"), str(tmp_path)], cwd=tmp_path, env=env,
                   check=True, timeout=240)  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 3  # one epoch: the same number of steps on both ranks
    for step in zip(*ranks, strict=True):
        phases = {b["phase"] for b in step}
        assert len(phases) == 1  # both ranks change phase at the same step
        assert all(b["shape"][0] == (2 if phases == {0} else 3) == len(b["keys"]) for b in step)  # full
    assert [b["phase"] for b in ranks[0]][:4] == [0, 0, 0, 1]
    assert any(a["shape"] != b["shape"] for a, b in zip(*ranks, strict=True))  # ranks in different buckets
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    local = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics stay per rank
    weights = [k for k in states[0] if not k.endswith(local)]
    assert len(weights) > 100 and all(torch.equal(states[0][k], states[1][k]) for k in weights)
