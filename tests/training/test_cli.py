"""main.py end to end on CPU with the tiny config: run directory, checkpoints, resume, errors, signals, DDP."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klvae.training.cli import main
from klvae.training.trainer import parse_gpus
from tests.cli_helpers import MAIN, TINY, only_run_dir, subprocess_env, tiny_args, train_losses


def shard_config(tmp_path: Path, shards: list[list[dict]]) -> Path:
    """Write webdataset shards and a copy of the tiny config whose data section streams them."""
    from omegaconf import OmegaConf

    from tests.data.conftest import write_shard

    for i, samples in enumerate(shards):
        write_shard(tmp_path / f"train-{i:06d}.tar", samples)
    config = OmegaConf.load(TINY)
    config.data = {
        "target": "klvae.data.WebDataModule",
        "params": {
            "train": {"shards": f"{tmp_path}/train-{{000000..{len(shards) - 1:06d}}}.tar", "epoch_length": 8},
            "size": 32, "batch_size": 2, "num_workers": 1, "shuffle_buffer": 0, "persistent_workers": False,
        },
    }  # fmt: skip
    OmegaConf.save(config, tmp_path / "shards.yaml")
    return tmp_path / "shards.yaml"


def jpeg_samples(start: int, n: int) -> list[dict]:
    from tests.data.conftest import encode, random_image

    return [{"__key__": f"{i:04d}", "jpg": encode(random_image(i, 48, 48))} for i in range(start, start + n)]


def test_train_writes_run_dir_and_weights_only_checkpoints(photos, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=6")) == 0
    run = only_run_dir(tmp_path / "logs")
    assert run.name.endswith("_tiny_test")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert {"last.ckpt", "iter_00000003.ckpt", "iter_00000006.ckpt"} <= set(ckpts)
    assert any(n.startswith("best-it") for n in ckpts), ckpts  # top-k by val/rec_loss
    assert not [n for n in ckpts if n.endswith(".tmp")]  # atomic writes leave no temp files
    (config,) = (run / "configs").glob("*-project.yaml")
    assert "train_dir: " + str(photos) in config.read_text()
    assert list((run / "images" / "train").glob("grid_it*.png"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["klvae"]["iteration"] == 6
    assert len(ckpt["optimizer_states"]) == 2
    assert "loss.discriminator.main.0.weight" in ckpt["state_dict"]
    assert (
        "Setting learning rate to 2.00e-04 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 1 (num_nodes) * 2 (batchsize)"
        in caplog.text
    )
    # Both GAN phases ran (disc_start=3): autoencoder and discriminator losses were logged.
    (metrics,) = run.glob("csv/*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("train/total_loss") for r in rows)
    assert any(r.get("train/disc_loss") and float(r["train/disc_factor"] or 0) == 1.0 for r in rows)


def test_resume_reproduces_uninterrupted_run(photos, tmp_path):
    # One batch per epoch (4 photos, batch 4) and an RNG-free data order: the resumed run must see the
    # same batches; weights, both Adam states, EMA, the iteration counter (GAN phase) and RNG must match.
    common = [
        "data.target=tests.cli_helpers.OrderedFolderDataModule", "data.params.batch_size=4",
        "model.params.ema_decay=0.9", "lightning.val_every_n_iterations=100",
    ]  # fmt: skip
    assert main(tiny_args(photos, tmp_path / "full", *common, "lightning.max_iterations=7")) == 0
    assert main(tiny_args(photos, tmp_path / "part", *common, "lightning.max_iterations=4")) == 0
    part = only_run_dir(tmp_path / "part")
    assert main(["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.max_iterations=7"]) == 0
    full, resumed = train_losses(only_run_dir(tmp_path / "full")), train_losses(part)
    assert sorted(full) == sorted(resumed) == list(range(1, 8))
    for it in range(5, 8):  # the iterations after the resume, in both GAN phases
        assert full[it][0] == resumed[it][0]
        assert full[it][1] == pytest.approx(resumed[it][1], rel=1e-5), it


def test_resume_prints_config_differences(photos, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=2")) == 0
    run = only_run_dir(tmp_path / "logs")
    caplog.clear()
    args = ["-t", "-r", str(run / "checkpoints" / "last.ckpt"), "--logger", "csv", "--no-test"]
    assert main([*args, "lightning.max_iterations=3", "model.params.lossconfig.params.disc_start=2"]) == 0
    out = caplog.text
    assert "model.params.lossconfig.params.disc_start: 3 -> 2" in out
    assert "lightning.max_iterations: 2 -> 3" in out
    assert len(list((run / "configs").glob("*-project.yaml"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "missing.yaml", "-t"], "config file 'missing.yaml' does not exist"),
        (["-t", "-r", "no/such/run"], "--resume 'no/such/run': no such run directory"),
        (["-b", TINY, "-t", "model.params.not_a_param=1"], "unknown parameter(s) ['not_a_param']"),
        (["-b", TINY, "-t", "lightning.trainer.max_epoch=1"], "unknown or CLI-owned key(s) ['max_epoch']"),
        (["-b", TINY, "-t", "lightning.trianer.x=1"], "unknown key(s) ['trianer'] in lightning:"),
        (["-b", TINY, "-t", "--gpus", "zero"], "--gpus 'zero'"),
        ([], "no config given"),
    ],
)
def test_bad_invocation_is_one_error_line(photos, tmp_path, capsys, argv, message):
    argv = [*argv, "-l", str(tmp_path / "logs"), "--logger", "csv", f"data.params.train_dir={photos}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_resume_run_dir_without_checkpoint_fails(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["-t", "-r", str(tmp_path / "run")]) == 2
    assert "checkpoints/last.ckpt does not exist" in capsys.readouterr().err


def test_parse_gpus_follows_ldm_and_lightning():
    assert parse_gpus("0,") == [0]
    assert parse_gpus("0,1,2,3") == [0, 1, 2, 3]
    assert parse_gpus("2") == 2
    for bad in ("", "0,0", "-1", "a"):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad)


def test_ddp_two_cpu_processes_on_shards_with_batchnorm_discriminator(tmp_path):
    # 4 shards: each of the 2 ranks reads its own 2, and both must run the same number of batches or
    # the gloo collectives hang (the subprocess timeout turns a hang into a failure).
    config = shard_config(tmp_path, [jpeg_samples(4 * i, 4) for i in range(4)])
    args = [
        "-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test",
        "lightning.max_iterations=6", "lightning.trainer.devices=2", "lightning.trainer.accelerator=cpu",
        "lightning.trainer.strategy=ddp", "lightning.trainer.enable_progress_bar=false",
        "lightning.val_every_n_iterations=null", "lightning.checkpoint.save_top_k=0",
    ]  # fmt: skip
    env = subprocess_env(tmp_path)
    result = subprocess.run(
        [sys.executable, MAIN, *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = only_run_dir(tmp_path / "logs")  # both ranks used the same run directory
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["klvae"]["iteration"] == 6  # disc_start=3: both GAN phases ran under DDP
    assert "* 2 (num_gpus)" in result.stdout + result.stderr
    assert os.path.exists(run / "checkpoints" / "iter_00000006.ckpt")


def test_webdataset_run_skips_and_logs_corrupt_images(tmp_path):
    samples = jpeg_samples(0, 7)
    samples.insert(3, {"__key__": "bad", "jpg": b"\xff\xd8 not a jpeg"})
    config = shard_config(tmp_path, [samples])
    args = [
        "-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test",
        "lightning.max_iterations=4", "lightning.trainer.enable_progress_bar=false",
        "lightning.checkpoint.save_top_k=0",
    ]  # fmt: skip
    assert main(args) == 0
    (metrics,) = only_run_dir(tmp_path / "logs").glob("csv/*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert max(float(r.get("data/skipped_corrupt_image") or 0) for r in rows) >= 1


def test_configs_of_launches_in_the_same_second_are_kept_in_order(tmp_path):
    from klvae.training.run_dir import RunDir, load_run_config, save_config

    run = RunDir(tmp_path / "run")
    run.make()
    for value in (1, 2, 3):
        save_config(run, {"lightning": {"max_iterations": value}}, "2026-01-01T00-00-00")
    assert len(list(run.configs.glob("*-project.yaml"))) == 3
    assert load_run_config(run).lightning.max_iterations == 3  # the last launch wins
