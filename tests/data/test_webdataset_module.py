"""WebDataModule: DDP splitting, equal batch counts, mixing, determinism, config errors."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from klvae.data import WebDataModule
from klvae.data.buckets import make_buckets
from klvae.data.sharding import assign_shards
from klvae.data.streams import worker_rng
from tests.data.conftest import encode, img2dataset_sample, make_shards, random_image, write_shard


def _module(train: str | None, val: str | None = None, **overrides) -> WebDataModule:
    params = dict(size=16, resize_to=24, batch_size=3, num_workers=2, shuffle_buffer=8, seed=0)
    params.update(overrides)
    return WebDataModule(
        train={"shards": train, "epoch_length": 24} if train else None,
        validation={"shards": val} if val else None,
        **params,
    )


def _run(loader) -> list[dict]:
    return list(loader)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_two_ranks_two_workers_see_disjoint_samples_and_equal_batch_counts(
    eight_shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, counts, lengths = {}, {}, {}
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        loader = _module(eight_shards).train_dataloader()
        batches = _run(loader)
        lengths[rank], counts[rank] = len(loader), len(batches)
        keys[rank] = {k for b in batches for k in b["__key__"]}
        assert all(b["image"].shape == (3, 3, 16, 16) for b in batches)
    # epoch_length 24 over 2 ranks x batch 3 -> 4 batches on each rank, whatever the shard sizes.
    assert lengths == counts == {0: 4, 1: 4}
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_workers_of_one_rank_read_disjoint_shards(eight_shards: str, single_rank: None) -> None:
    batches = _run(_module(eight_shards, num_workers=2).train_dataloader())
    # The DataLoader alternates workers: even batches come from worker 0, odd ones from worker 1.
    shards_of = [{k[:3] for b in batches[w::2] for k in b["__key__"]} for w in range(2)]
    assert shards_of[0] and shards_of[1] and not shards_of[0] & shards_of[1]


@pytest.mark.parametrize("n_shards", [8, 3, 1])
def test_validation_is_split_disjointly_and_completely_over_ranks_and_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_shards: int
) -> None:
    pattern = make_shards(tmp_path, "v", n_shards=n_shards, per_shard=5)
    seen = collections.Counter()
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        for batch in _module(None, pattern).val_dataloader():
            seen.update(batch["__key__"])
    assert len(seen) == 5 * n_shards and set(seen.values()) == {1}


def test_assignment_covers_every_sample_exactly_once() -> None:
    urls = [f"s{i}" for i in range(5)]
    for world_size, workers in [(1, 1), (2, 2), (4, 2), (8, 1)]:
        owners = collections.Counter()
        for rank in range(world_size):
            for worker in range(workers):
                a = assign_shards(urls, rank, world_size, worker, workers)
                owners.update((u, i) for u in a.urls for i in range(12) if i % a.stride == a.offset)
        assert len(owners) == 5 * 12 and set(owners.values()) == {1}, (world_size, workers)


def test_worker_seeds_differ_by_rank_worker_and_epoch() -> None:
    draws = {worker_rng(0, r, w, e).random() for r in range(2) for w in range(2) for e in range(2)}
    assert len(draws) == 8
    assert worker_rng(0, 1, 1, 1).random() == worker_rng(0, 1, 1, 1).random()


def test_validation_order_and_pixels_are_deterministic(eight_shards: str, single_rank: None) -> None:
    dm = _module(None, eight_shards)
    first, second = _run(dm.val_dataloader()), _run(dm.val_dataloader())
    assert [b["__key__"] for b in first] == [b["__key__"] for b in second]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
    assert sum(len(b["__key__"]) for b in first) == 48


def test_epochs_draw_new_orders(eight_shards: str, single_rank: None) -> None:
    loader = _module(eight_shards, num_workers=0).train_dataloader()
    epochs = [[k for b in loader for k in b["__key__"]] for _ in range(2)]
    assert epochs[0] != epochs[1]


def test_sources_are_mixed_by_weight(tmp_path: Path, single_rank: None) -> None:
    a = make_shards(tmp_path / "a", "a", n_shards=2, per_shard=4)
    b = make_shards(tmp_path / "b", "b", n_shards=2, per_shard=4)
    dm = WebDataModule(
        train={
            "sources": [{"shards": a, "weight": 3.0}, {"shards": [b], "weight": 1.0}],
            "epoch_length": 400,
        },
        size=8,
        batch_size=20,
        num_workers=0,
        shuffle_buffer=0,
    )
    keys = [k for batch in dm.train_dataloader() for k in batch["__key__"]]
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert len(keys) == 400 and 0.65 < share_a < 0.85


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp"])
def test_img2dataset_style_shards_are_read(tmp_path: Path, single_rank: None, ext: str) -> None:
    shard = write_shard(tmp_path / "00000.tar", [img2dataset_sample(f"{i:09d}", i, ext) for i in range(4)])
    batches = _run(_module(None, str(shard), batch_size=4, num_workers=0).val_dataloader())
    assert len(batches) == 1 and batches[0]["__key__"] == [f"{i:09d}" for i in range(4)]
    image = batches[0]["image"]
    assert image.shape == (4, 3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_misspelled_pattern_fails_at_setup_naming_the_pattern(eight_shards: str) -> None:
    typo = eight_shards.replace("a-{", "b-{")
    dm = _module(typo)
    with pytest.raises(ValueError, match="shard pattern") as info:
        dm.setup("fit")
    assert typo in str(info.value)
    with pytest.raises(ValueError, match="glob"):
        _module(str(Path(eight_shards).parent / "nothing-*.tar")).setup("fit")
    with pytest.raises(ValueError, match="shard pattern"):
        WebDataModule(validation={"shards": []}).setup("validate")


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"shards": "x.tar", "epoch_length": 10, "shuffle": True}, "unknown key"),
        ({"shards": "x.tar"}, "epoch_length"),
        ({"sources": [{"shards": "x.tar", "wieght": 1}], "epoch_length": 10}, "wieght"),
        ({"sources": [{"shards": "x.tar", "weight": 0}], "epoch_length": 10}, "weight"),
        ({"sources": [], "epoch_length": 10}, "sources"),
    ],
)
def test_bad_train_blocks_are_rejected_with_the_key(train: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebDataModule(train=train)


def _many_shapes_shards(root: Path, n_shards: int = 4, per_shard: int = 12) -> str:
    """JPEGs of six aspect ratios (1:1 to 2.2:1, both orientations): three buckets at 32² (step 8)."""
    shapes = [(40, 40), (30, 60), (60, 30), (36, 48), (48, 36), (32, 70)]
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = [
            {"__key__": f"m{s}x{i:02d}", "jpg": encode(random_image(100 * s + i, *shapes[(s + i) % 6]))}
            for i in range(per_shard)
        ]
        write_shard(root / f"m-{s:06d}.tar", samples)
    return str(root / f"m-{{000000..{n_shards - 1:06d}}}.tar")


def test_bucketed_shards_give_equal_counts_of_full_one_bucket_batches_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pattern = _many_shapes_shards(tmp_path)
    buckets, counts, keys = set(make_buckets(32, 8)), {}, {}
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        module = WebDataModule(
            train={"shards": pattern, "epoch_length": 24}, size=32, batch_size=3, num_workers=2,
            shuffle_buffer=6, buckets={"step": 8}, random_flip=True,
        )  # fmt: skip
        batches = _run(module.train_dataloader())
        counts[rank] = len(batches)
        keys[rank] = {k for b in batches for k in b["__key__"]}
        for batch in batches:
            n, _, h, w = batch["image"].shape
            assert n == 3 and (h, w) in buckets
    assert counts == {0: 4, 1: 4} and not keys[0] & keys[1]


def test_bucketed_validation_reads_each_sample_once_in_a_fixed_order(
    tmp_path: Path, single_rank: None
) -> None:
    pattern = _many_shapes_shards(tmp_path, n_shards=2, per_shard=7)
    module = WebDataModule(
        validation={"shards": pattern}, size=32, batch_size=3, num_workers=2, buckets={"step": 8}
    )
    first, second = _run(module.val_dataloader()), _run(module.val_dataloader())
    assert sorted(k for b in first for k in b["__key__"]) == sorted(
        f"m{s}x{i:02d}" for s in range(2) for i in range(7)
    )
    assert [b["__key__"] for b in first] == [b["__key__"] for b in second]
    assert all(a["image"].equal(b["image"]) for a, b in zip(first, second, strict=True))
    assert len({tuple(b["image"].shape[2:]) for b in first}) == 3  # native aspect ratios: three buckets
