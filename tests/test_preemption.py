"""Preemption as a scheduler does it: the signal goes to the whole process group, loader workers included."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from klvae.io.checkpoints import checkpoint_problem
from klvae.training.cli import main
from tests.cli_helpers import MAIN, only_run_dir, subprocess_env, tiny_args, write_nonsquare_photos


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


def _final_state(logdir: Path) -> dict:
    return torch.load(only_run_dir(logdir) / "checkpoints" / "last.ckpt", weights_only=True)


def _last_logged(run: Path, key: str) -> float:
    rows = [row for path in sorted(run.glob("csv/*/metrics.csv")) for row in csv.DictReader(path.open())]
    return [float(row[key]) for row in rows if row.get(key)][-1]


@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_sigterm_inside_an_accumulation_round_finishes_the_round_and_resumes_exactly(tmp_path, schedule):
    """SIGTERM handled in the first micro-batch of round 3 (2 batches per round): the round is finished
    before last.ckpt is written (the accumulated gradients are not in a checkpoint), and the resumed run
    ends bitwise where the uninterrupted one does. The run's counters (skipped updates, skipped images)
    continue across the resume instead of restarting."""
    photos = write_nonsquare_photos(tmp_path / "photos", n=6)
    (photos / "broken.png").write_bytes(b"\x89PNG not really")  # counted, replaced by another file
    common = [
        f"model.params.update_schedule={schedule}", "model.params.accumulate_grad_batches=2",
        "model.params.ema_decay=0.9", "model.target=tests.models.faults.FaultyAutoencoderKL",
        "model.params.faults=[{optimizer: ae, kind: loss, iterations: [1]}]",
        "data.params.val_dir=null", "lightning.val_every_n_iterations=null",
        "lightning.checkpoint.save_top_k=0", "lightning.image_logger.every_n_iterations=0",
        "lightning.checkpoint.every_n_iterations=100", "lightning.checkpoint.last_every_n_iterations=100",
        "lightning.max_iterations=5",
    ]  # fmt: skip
    assert main(tiny_args(photos, tmp_path / "full", *common)) == 0
    signal_at = ["lightning.callbacks.sig.target=tests.models.faults.SignalAtBatch",
                 "lightning.callbacks.sig.params.batch=4"]  # fmt: skip
    assert main(tiny_args(photos, tmp_path / "part", *common, *signal_at)) == 143
    saved = _final_state(tmp_path / "part")["klvae"]
    assert (saved["iteration"], saved["micro_step"]) == (3, 6)  # batch 4 was mid-round: batch 5 finished it
    assert saved["nonfinite"]["skipped"] == [1, 0]
    part = only_run_dir(tmp_path / "part")
    assert (
        main(
            ["-t", "-r", str(part), "--logger", "csv", "--no-test", "lightning.callbacks.sig.params.batch=-1"]
        )
        == 0
    )
    full, resumed = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert resumed["klvae"]["iteration"] == full["klvae"]["iteration"] == 5
    differing = [
        k for k in full["state_dict"] if not torch.equal(full["state_dict"][k], resumed["state_dict"][k])
    ]
    assert differing == []
    assert resumed["klvae"]["nonfinite"] == full["klvae"]["nonfinite"]
    full_run = only_run_dir(tmp_path / "full")
    for key in ("train/skipped_nonfinite", "data/skipped_total"):
        assert _last_logged(part, key) == _last_logged(full_run, key) > 0, key
