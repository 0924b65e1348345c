"""``make demo`` end to end (slow: a real, if short, training run on the bundled photographs)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.cli_helpers import REPO, subprocess_env


@pytest.mark.slow
def test_demo_trains_and_reports_psnr(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "demo.py"),
        "--workdir",
        str(tmp_path),
        "--max-iterations",
        "20",
    ]
    result = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    found = re.search(r"validation PSNR ([\d.]+) dB vs ([\d.]+) dB for the baseline", out)
    psnr, baseline = float(found.group(1)), float(found.group(2))
    assert 5.0 < psnr < 60.0 and 15.0 < baseline < 30.0  # 20 iterations: not yet better than the baseline
    (run,) = (tmp_path / "logs").iterdir()
    assert (run / "reconstructions.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
