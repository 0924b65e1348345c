"""Resolution phases: the schedule, and both datamodules switching resolution and batch size on time."""

from __future__ import annotations

from pathlib import Path

import pytest

from klvae.data import ImageFolderDataModule, WebDataModule
from klvae.data.phases import PhaseSchedule
from klvae.data.resume import EpochStart
from klvae.errors import ConfigError
from tests.data.conftest import encode, random_image, write_shard

PHASES = [
    {"iterations": 3, "size": 16, "batch_size": 2},
    {"iterations": 2, "size": 24},
    {"size": 32, "batch_size": 4},
]


def test_schedule_starts_and_the_phase_of_each_iteration() -> None:
    schedule = PhaseSchedule.from_config(PHASES, size=32, batch_size=3, resize_to=None)
    assert schedule.starts == (0, 3, 5) and [p.batch_size for p in schedule] == [2, 3, 4]
    assert [schedule.index_at(i) for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    # With 2 batches per iteration, batch 6 is trained in iteration 3, the first of phase 1.
    assert [schedule.index_of_batch(b, 2) for b in (5, 6, 9, 10)] == [0, 1, 1, 2]
    assert schedule.describe(2) == "phase 3/3: 32², batch 4" and schedule.configured


def test_without_phases_one_phase_runs_the_whole_run() -> None:
    schedule = PhaseSchedule.from_config(None, size=256, batch_size=12, resize_to=384)
    assert len(schedule) == 1 and not schedule.configured and schedule.index_at(10**9) == 0
    assert (schedule[0].size, schedule[0].batch_size, schedule[0].resize_to) == (256, 12, 384)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([{"iterations": 3}], r"phases\[0\]: missing 'size'"),
        ([{"size": 16, "iters": 3}], r"phases\[0\]: unknown key\(s\) \['iters'\]"),
        ([{"size": 16}, {"size": 32}], r"phases\[0\]: only the last phase may leave out 'iterations'"),
        ([{"size": 16, "iterations": 0}, {"size": 32}], r"phases\[0\].iterations must be an int >= 1, got 0"),
        ([{"size": 16, "batch_size": "4"}], r"phases\[0\].batch_size must be an int >= 1, got '4'"),
        ([], "expected a non-empty list"),
        ({"size": 16}, "expected a non-empty list"),
    ],
)
def test_bad_phase_configs_are_one_clear_error(config, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PhaseSchedule.from_config(config, size=32, batch_size=3, resize_to=None)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(encode(random_image(i, 40, 40), "PNG"))
    return folder


def _shards(tmp_path: Path) -> str:
    samples = [{"__key__": f"k{i:02d}", "jpg": encode(random_image(i, 40, 40))} for i in range(24)]
    write_shard(tmp_path / "p-0.tar", samples[:12])
    write_shard(tmp_path / "p-1.tar", samples[12:])
    return str(tmp_path / "p-{0..1}.tar")


def _modules(tmp_path: Path, single_rank: None) -> list:
    folder = ImageFolderDataModule(str(_folder(tmp_path)), size=32, batch_size=3, phases=PHASES)
    shards = WebDataModule(
        train={"shards": _shards(tmp_path), "epoch_length": 12}, size=32, batch_size=3, num_workers=0,
        shuffle_buffer=4, phases=PHASES,
    )  # fmt: skip
    return [folder, shards]


@pytest.mark.parametrize("which", ["folder", "shards"])
def test_batches_switch_size_and_batch_size_at_the_phase_boundaries(
    tmp_path, single_rank, which: str
) -> None:
    module = _modules(tmp_path, single_rank)[which == "shards"]
    loader = module.train_dataloader()
    batches = [b for _ in range(3) for b in loader]  # epochs of len(loader) batches, one after another
    shapes = [tuple(b["image"].shape) for b in batches[:8]]
    assert shapes == [(2, 3, 16, 16)] * 3 + [(3, 3, 24, 24)] * 2 + [(4, 3, 32, 32)] * 3
    assert [b["_phase"] for b in batches[:8]] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert (
        len(loader) == {"folder": 6, "shards": 6}[which]
    )  # one pass / epoch_length at the first phase's batch


@pytest.mark.parametrize("which", ["folder", "shards"])
def test_accumulation_stretches_each_phase_over_its_iterations_batches(
    tmp_path, single_rank, which: str
) -> None:
    module = _modules(tmp_path, single_rank)[which == "shards"]
    loader = module.train_dataloader()
    source = loader.sampler if which == "folder" else loader.dataset
    # An epoch starting at batch 4 of the run with 2 batches per iteration: batches 4, 5 are iteration 2
    # (phase 0), 6..9 iterations 3, 4 (phase 1), 10.. phase 2.
    source.start_epoch(EpochStart(epoch=0, skip=0, position=4, batches_per_iteration=2))
    batches = list(iter(source) if which == "shards" else (module._train_batches[k] for k in source))
    assert [b["_phase"] for b in batches] == [0, 0, 1, 1, 1, 1]
    assert [b["image"].shape[0] for b in batches] == [2, 2, 3, 3, 3, 3]


def test_validation_stays_at_data_params_size_in_every_phase(tmp_path, single_rank) -> None:
    folder = _folder(tmp_path)
    module = ImageFolderDataModule(str(folder), str(folder), size=32, batch_size=5, phases=PHASES)
    assert [tuple(b["image"].shape) for b in module.val_dataloader()] == [(5, 3, 32, 32)] * 2 + [
        (2, 3, 32, 32)
    ]
    assert module.image_shapes() == {(16, 16), (24, 24), (32, 32)}
