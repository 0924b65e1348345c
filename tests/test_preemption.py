"""Preemption as a scheduler does it: the signal goes to the whole process group, loader workers included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from klvae.callbacks.checkpointing import checkpoint_problem
from tests.cli_helpers import MAIN, only_run_dir, subprocess_env, tiny_args


def _signal_group_mid_run(photos: Path, tmp_path: Path, signum: int) -> tuple[subprocess.Popen, str, Path]:
    args = tiny_args(
        photos, tmp_path / "logs", "lightning.max_iterations=100000", "data.params.num_workers=2",
        "lightning.checkpoint.last_every_n_iterations=100000", "lightning.val_every_n_iterations=100000",
        "lightning.image_logger.every_n_iterations=1000",
    )  # fmt: skip
    # A session of its own, as a batch job has: os.killpg reaches main process and DataLoader workers.
    proc = subprocess.Popen(
        [sys.executable, MAIN, *args], env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while time.time() < deadline:  # training is under way once the iteration-2 grid exists
            if list((tmp_path / "logs").glob("*/images/train/grid_it00000002.png")):
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not start")
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out, only_run_dir(tmp_path / "logs")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_process_group_with_workers_writes_last_ckpt(photos, tmp_path, signum, code):
    proc, out, run = _signal_group_mid_run(photos, tmp_path, signum)
    assert proc.returncode == code, out[-3000:]  # 128 + signal: what a scheduler expects
    assert f"{signal.Signals(signum).name} received: wrote" in out, out[-3000:]
    assert "is killed by signal" not in out  # the workers ignored the signal
    last = run / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(last) is None
    assert torch.load(last, weights_only=True)["klvae"]["iteration"] >= 2
    assert f"python main.py -t -r {run}" in out
