"""Resume continues exactly: after -r the logged losses equal the uninterrupted run's (CPU, within 1e-5).

Both datamodules, shuffled, random crops and flips on non-square photos, loader workers, and a resume in
the middle of an epoch (the loader position comes from the checkpoint).
"""

from __future__ import annotations

import pytest

from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args, train_losses, write_nonsquare_photos
from tests.data.conftest import encode, random_image
from tests.training.test_cli import shard_config


def _compare(full_dir, part_dir, resumed_from: int, total: int) -> None:
    full, resumed = train_losses(only_run_dir(full_dir)), train_losses(only_run_dir(part_dir))
    assert sorted(full) == sorted(resumed) == list(range(1, total + 1))
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
