"""Resume continues exactly: after -r the logged losses equal the uninterrupted run's (CPU, within 1e-5).

Both datamodules, shuffled, random crops and flips on non-square photos, loader workers, and a resume in
the middle of an epoch (the loader position comes from the checkpoint).
"""

from __future__ import annotations

import csv

import pytest

from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args, train_losses, write_nonsquare_photos
from tests.data.conftest import encode, random_image
from tests.training.test_cli import shard_config


def _compare(full_dir, part_dir, resumed_from: int, total: int, first: int = 1) -> None:
    full, resumed = train_losses(only_run_dir(full_dir)), train_losses(only_run_dir(part_dir))
    # (with accumulation, the first micro-batch of iteration 0 logs train/iteration 0: first = 0)
    assert sorted(full) == sorted(resumed) == list(range(first, total + 1))
    for it in range(resumed_from + 1, total + 1):  # both GAN phases (disc_start=3)
        assert full[it][0] == resumed[it][0], it
        assert full[it][1] == pytest.approx(resumed[it][1], rel=1e-5, abs=1e-7), (it, full[it], resumed[it])


def test_folder_resume_mid_epoch_is_exact_with_shuffle_random_crops_and_workers(tmp_path):
    # 6 non-square photos, batch 2: 3 batches per epoch; stop at iteration 4 = one batch into epoch 1.
    photos = write_nonsquare_photos(tmp_path / "photos", n=6)
    common = [
        "data.params.random_flip=true", "data.params.num_workers=2", "data.params.val_dir=null",
        "lightning.val_every_n_iterations=null", "lightning.checkpoint.save_top_k=0",
        "lightning.image_logger.every_n_iterations=0",
    ]  # fmt: skip
    assert main(tiny_args(photos, tmp_path / "full", *common, "lightning.max_iterations=8")) == 0
    assert main(tiny_args(photos, tmp_path / "part", *common, "lightning.max_iterations=4")) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=8"]) == 0
    _compare(tmp_path / "full", tmp_path / "part", 4, 8)


def test_webdataset_resume_mid_epoch_is_exact_with_shuffle_buffer_and_workers(tmp_path):
    # 3 shards of 48x40 / 40x56 JPEGs, 2 workers, a shuffle buffer; 4 batches per epoch; resume at 6
    # (two batches into epoch 1: the workers regenerate and drop the batches already trained on).
    shapes = [(48, 40), (40, 56)]
    samples = [
        [{"__key__": f"{s}x{i}", "jpg": encode(random_image(6 * s + i, *shapes[i % 2]))} for i in range(6)]
        for s in range(3)
    ]
    config = shard_config(tmp_path, samples)
    args = [
        "-b", str(config), "-t", "--logger", "csv", "--no-test",
        "data.params.num_workers=2", "data.params.shuffle_buffer=8", "data.params.persistent_workers=true",
        "lightning.val_every_n_iterations=null", "lightning.checkpoint.save_top_k=0",
        "lightning.trainer.enable_progress_bar=false", "lightning.image_logger.every_n_iterations=0",
    ]  # fmt: skip
    assert main([*args, "-l", str(tmp_path / "full"), "lightning.max_iterations=10"]) == 0
    assert main([*args, "-l", str(tmp_path / "part"), "lightning.max_iterations=6"]) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=10"]) == 0
    _compare(tmp_path / "full", tmp_path / "part", 6, 10)


def _photos_of_many_shapes(folder, n: int = 12):
    """JPEGs of six aspect ratios (1:1 to 2.2:1, both orientations): three buckets at 32², four at 48²."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(40, 40), (30, 60), (60, 30), (36, 48), (48, 36), (32, 70)]
    for i in range(n):
        (folder / f"{i:02d}.jpg").write_bytes(encode(random_image(i, *shapes[i % len(shapes)])))
    return folder


_PHASES = "data.params.phases=[{iterations: 5, size: 32, batch_size: 2}, {size: 48, batch_size: 3}]"


def test_folder_resume_across_a_phase_change_is_exact_with_buckets_and_accumulation(tmp_path):
    # Buckets, random crops and flips, 2 workers, 2 batches per iteration; 32² buckets until iteration 5,
    # then 48² buckets at batch 3. The part run stops at iteration 3, before the change.
    photos = _photos_of_many_shapes(tmp_path / "photos")
    common = [
        "data.params.buckets={step: 8}", _PHASES, "data.params.random_flip=true", "data.params.num_workers=2",
        "data.params.val_dir=null", "model.params.accumulate_grad_batches=2",
        "lightning.val_every_n_iterations=null", "lightning.checkpoint.save_top_k=0",
        "lightning.image_logger.every_n_iterations=0",
    ]  # fmt: skip
    assert main(tiny_args(photos, tmp_path / "full", *common, "lightning.max_iterations=8")) == 0
    assert main(tiny_args(photos, tmp_path / "part", *common, "lightning.max_iterations=3")) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=8"]) == 0
    _compare(tmp_path / "full", tmp_path / "part", 3, 8, first=0)
    _assert_phase_logged(only_run_dir(tmp_path / "full"), change=5, total=8, batches_per_iteration=2)


def test_webdataset_resume_across_a_phase_change_is_exact_with_buckets_and_persistent_workers(tmp_path):
    shapes = [(40, 40), (30, 60), (60, 30), (36, 48), (48, 36), (32, 70)]
    samples = [
        [
            {"__key__": f"{s}x{i}", "jpg": encode(random_image(8 * s + i, *shapes[(s + i) % 6]))}
            for i in range(8)
        ]
        for s in range(3)
    ]
    config = shard_config(tmp_path, samples)
    args = [
        "-b", str(config), "-t", "--logger", "csv", "--no-test", "data.params.buckets={step: 8}", _PHASES,
        "data.params.num_workers=2", "data.params.shuffle_buffer=8", "data.params.persistent_workers=true",
        "data.params.random_flip=true", "lightning.val_every_n_iterations=null",
        "lightning.checkpoint.save_top_k=0", "lightning.trainer.enable_progress_bar=false",
        "lightning.image_logger.every_n_iterations=0",
    ]  # fmt: skip
    # epoch_length 8 at batch 2: 4 batches per epoch; the part run stops 2 batches into epoch 1, the
    # phase changes at iteration 5 (1 batch later), the full run ends in epoch 2.
    assert main([*args, "-l", str(tmp_path / "full"), "lightning.max_iterations=10"]) == 0
    assert main([*args, "-l", str(tmp_path / "part"), "lightning.max_iterations=6"]) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=10"]) == 0
    _compare(tmp_path / "full", tmp_path / "part", 6, 10)
    _assert_phase_logged(only_run_dir(tmp_path / "full"), change=5, total=10)


def _assert_phase_logged(run, change: int, total: int, batches_per_iteration: int = 1) -> None:
    """data/phase, logged for every batch of a one-launch run: 0 for the batches of the iterations before
    ``change``, then 1."""
    rows = [row for path in run.glob("csv/*/metrics.csv") for row in csv.DictReader(path.open())]
    phases = [int(float(r["data/phase"])) for r in rows if r.get("data/phase")]
    expected = [0] * change * batches_per_iteration + [1] * (total - change) * batches_per_iteration
    assert phases == expected, phases
