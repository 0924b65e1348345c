"""klvae-eval end to end on a tiny model: folder and shard sources, JSON, grid, missing-weight errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.eval_data import image_batches
from klvae.evaluate import evaluate, main
from klvae.export import export_ldm
from klvae.inference import InferenceVAE
from klvae.loading import read_vae_weights
from klvae.metrics import psnr, quantize, ssim, to_unit
from klvae.modules.vae import KLAutoencoder

TINY_F2 = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = KLAutoencoder(TINY_F2, 4)
    torch.save(model.state_dict(), root / "vae.pth")
    ckpt = export_ldm(read_vae_weights(root / "vae.pth", ddconfig=TINY_F2), root / "vae.safetensors")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(root / "val-000000.tar", "w") as tar:
        for i in range(5):
            # Smooth-ish content plus noise of a different level per image, so PSNRs differ.
            base = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
            arr = np.clip(base + rng.normal(0, 10 + 20 * i, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "imgs" / f"{i}.png")
            data = (root / "imgs" / f"{i}.png").read_bytes()
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root, model, ckpt


def test_metrics_match_direct_computation(setup) -> None:
    root, model, _ = setup
    vae = InferenceVAE(model)
    batches = image_batches(str(root / "imgs"), 32, 2)
    result = evaluate(vae, batches, keep=2, total=batches.total)
    x, _ = next(iter(image_batches(str(root / "imgs"), 32, 5)))
    r = quantize(to_unit(vae.decode(vae.encode(x))))
    assert (
        result.metrics["num_images"] == 5
        and result.metrics["rfid"] is None
        and result.metrics["lpips"] is None
    )
    # batch 2 vs batch 5: float32 convolutions may sum in another order (~1e-5 dB)
    assert abs(result.metrics["psnr"] - psnr(to_unit(x), r).mean().item()) < 1e-4
    assert abs(result.metrics["ssim"] - ssim(to_unit(x), r).mean().item()) < 1e-6
    assert result.worst[0][0] <= result.worst[1][0] <= result.best[1][0] <= result.best[0][0]
    assert result.worst[0][2].shape == (2, 3, 32, 32) and result.worst[0][2].dtype == torch.uint8


def test_cli_writes_json_and_grid_and_reports_missing_inception(setup, tmp_path) -> None:
    root, _, ckpt = setup
    out = tmp_path / "out"
    main([str(ckpt), "--data", str(root / "imgs"), "--resolution", "32", "--batch-size", "2", "--out", str(out),
          "--lpips", "random", "--inception", str(tmp_path / "missing.pt"), "--grid-k", "2"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["num_images"] == 5
        and metrics["rfid"] is None
        and "klvae-fetch-weights" in metrics["errors"]["rfid"]
    )
    assert metrics["lpips"] > 0 and 0 < metrics["ssim"] < 1 and np.isfinite(metrics["psnr"])
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 5
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64 + 8, 2 * 32)


def test_shards_give_the_same_numbers_as_the_folder(setup, tmp_path) -> None:
    root, _, ckpt = setup
    for name, data in [("a", root / "imgs"), ("b", root / "val-{000000..000000}.tar")]:
        main(
            [
                str(ckpt),
                "--data",
                str(data),
                "--resolution",
                "32",
                "--out",
                str(tmp_path / name),
                "--lpips",
                "none",
                "--inception",
                "none",
            ]
        )
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    assert a["num_images"] == b["num_images"] == 5 and abs(a["psnr"] - b["psnr"]) < 1e-9
