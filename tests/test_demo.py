"""``make demo`` end to end (slow: a real, if short, training run on the bundled photographs), then the demo
VAE scored on a folder of the user's own photos (``--eval-only --eval-images``), as a user would check it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from klvae.data.sample_images import skimage_photo_paths
from tests.cli_helpers import REPO, subprocess_env

SCORE = r"{} PSNR ([\d.]+) dB vs ([\d.]+) dB for the baseline \([+-][\d.]+ dB; SSIM ([\d.]+) vs ([\d.]+); the VAE wins on (\d+) of (\d+)\)"


@pytest.mark.slow
def test_demo_trains_and_reports_psnr(tmp_path):
    demo = [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(tmp_path)]
    env = subprocess_env(tmp_path)
    result = subprocess.run(
        [*demo, "--max-iterations", "20"], env=env, capture_output=True, text=True, timeout=900
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    found = re.search(SCORE.format("held-out photos"), out)
    psnr, baseline = float(found.group(1)), float(found.group(2))
    assert 5.0 < psnr < 60.0 and 15.0 < baseline < 30.0  # 20 iterations: not yet better than the baseline
    assert found.group(6) == "6", out[-2000:]  # the six photos the hash split holds out
    assert re.search(r"demo took \d+ s \(\d+ CPU-seconds", out)
    (run,) = (tmp_path / "logs").iterdir()
    assert (run / "reconstructions.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()

    # A user's own folder (any size, nested, RGBA): scored without training again, baseline next to it.
    photos = tmp_path / "my photos" / "nested"
    photos.mkdir(parents=True)
    for path in skimage_photo_paths()[:3]:
        Image.open(path).convert("RGBA").resize((150, 110)).save(photos / f"{path.stem}.png")
    cmd = [*demo, "--eval-only", "--eval-images", str(tmp_path / "my photos")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "main.py" not in out  # --eval-only trains nothing
    found = re.search(SCORE.format(re.escape(f"photos in {tmp_path / 'my photos'}")), out)
    assert found and found.group(6) == "3", out[-2000:]
    assert list(run.glob("reconstructions_0_my photos.png"))


@pytest.mark.slow
def test_default_demo_beats_the_thumbnail_baseline(tmp_path):
    """The full ``make demo`` (3,000 iterations, ~8 CPU-minutes): the promise of the README, by >= 1 dB PSNR
    and on SSIM on the held-out photos."""
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(tmp_path)]
    result = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=3600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    found = re.search(SCORE.format("held-out photos"), out)
    psnr, baseline, ssim, baseline_ssim = (float(found.group(i)) for i in (1, 2, 3, 4))
    assert psnr >= baseline + 1.0 and ssim > baseline_ssim, found.group(0)


def test_demo_user_errors_are_one_error_line(tmp_path):
    demo = [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(tmp_path)]
    env = subprocess_env(tmp_path)
    cases = {
        "--eval-only": f"demo.py: error: no trained demo under {tmp_path}; run `python scripts/demo.py` first",
        "--eval-size=50": "demo.py: error: --eval-size 50: must be a positive multiple of 8 (the VAE's downsampling)",
    }
    for flag, line in cases.items():
        result = subprocess.run([*demo, flag], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == line
    assert not (tmp_path / "shards").exists()  # nothing was written or trained
