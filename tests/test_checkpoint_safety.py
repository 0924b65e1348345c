"""Checkpoints never hold NaN weights, damaged ones are detected, resume falls back, runs never collide."""

from __future__ import annotations

import logging
import os

import pytorch_lightning as pl
import torch

from klvae.io.checkpoints import atomic_torch_save, checkpoint_problem
from klvae.training.cli import main
from klvae.training.run_dir import create_run_dir
from tests.cli_helpers import only_run_dir, tiny_args


class PoisonWeights(pl.Callback):
    """Turns one weight into NaN after iteration ``at`` (what a diverged update leaves behind)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.iteration == self.at:
            with torch.no_grad():
                pl_module.decoder.conv_out.weight.view(-1)[0] = float("nan")


def test_no_checkpoint_is_ever_written_with_nan_weights(photos, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    args = tiny_args(
        photos, tmp_path / "logs", "lightning.max_iterations=5",
        "lightning.callbacks.poison.target=tests.test_checkpoint_safety.PoisonWeights",
        "lightning.callbacks.poison.params.at=3", "lightning.checkpoint.every_n_iterations=2",
    )  # fmt: skip
    # The poison runs after the iteration-3 checkpoints were written: from iteration 4 on weights are NaN.
    assert main(args) == 0
    ckpts = only_run_dir(tmp_path / "logs") / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["klvae"]["iteration"] == 3  # the last good one
    for path in ckpts.glob("*.ckpt"):
        assert checkpoint_problem(path) is None, path
    assert (ckpts / "iter_00000002.ckpt").exists() and not (ckpts / "iter_00000004.ckpt").exists()
    assert "NOT writing last.ckpt at iteration 4" in caplog.text
    assert "last.ckpt stays the last good checkpoint (iteration 3)" in caplog.text
    # And resume refuses a checkpoint with NaN weights.
    bad = ckpts.parent / "nan.ckpt"
    state = torch.load(ckpts / "last.ckpt", weights_only=True)
    state["state_dict"]["decoder.conv_out.weight"].view(-1)[0] = float("nan")
    torch.save(state, bad)
    assert "weight tensor(s) are NaN/inf (first: decoder.conv_out.weight)" in checkpoint_problem(bad)


def test_damaged_last_ckpt_falls_back_to_newest_good_one(photos, tmp_path, caplog, capsys):
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=4",
                          "lightning.checkpoint.save_top_k=0")) == 0  # fmt: skip
    run = only_run_dir(tmp_path / "logs")
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: torch.load would not notice
    last.write_bytes(bytes(data))
    assert "SHA-256 does not match" in checkpoint_problem(last)
    capsys.readouterr()
    assert main(["-t", "-r", str(last), "--logger", "csv", "--no-test"]) == 2
    assert "cannot resume from this checkpoint: its SHA-256 does not match" in capsys.readouterr().err
    caplog.set_level(logging.WARNING)
    (run / "checkpoints" / ".last.ckpt.123.abcd.tmp").write_bytes(b"left by a SIGKILL")
    assert main(["-t", "-r", str(run), "--logger", "csv", "--no-test", "lightning.max_iterations=5"]) == 0
    assert "resuming from iter_00000003.ckpt instead: last.ckpt its SHA-256 does not match" in caplog.text
    assert torch.load(last, weights_only=True)["klvae"]["iteration"] == 5  # continued from 3, rewrote last
    assert not list((run / "checkpoints").glob(".*.tmp"))  # stale temp files removed at the start


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o644
    assert checkpoint_problem(tmp_path / "a.ckpt") == "holds no state_dict (not a training checkpoint)"


def test_checksum_verifies_across_a_crash_between_the_two_renames(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, path)
    old_bytes = path.read_bytes()
    atomic_torch_save({"state_dict": {"w": torch.zeros(2)}}, path)
    path.write_bytes(old_bytes)  # the sidecar already names the new file, the rename did not happen
    assert checkpoint_problem(path) is None


def test_two_launches_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    roots = []
    for _ in range(3):
        monkeypatch.delenv("KLVAE_RUN_DIR", raising=False)
        roots.append(create_run_dir(tmp_path, "tiny", "2026-01-01T00-00-00").root)
    assert [r.name for r in roots] == [
        "2026-01-01T00-00-00_tiny", "2026-01-01T00-00-00_tiny_1", "2026-01-01T00-00-00_tiny_2"
    ]  # fmt: skip
    assert all(r.is_dir() for r in roots)


def test_two_real_launches_at_once_do_not_share_a_run_dir(photos, tmp_path):
    import subprocess
    import sys

    from tests.cli_helpers import MAIN, subprocess_env

    args = [sys.executable, MAIN, *tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=1",
                                             "lightning.val_every_n_iterations=null")]  # fmt: skip
    procs = [subprocess.Popen(args, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    runs = sorted(p for p in (tmp_path / "logs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert len(list((run / "configs").glob("*.yaml"))) == 1
        assert len(list(run.glob("csv/*/metrics.csv"))) == 1
