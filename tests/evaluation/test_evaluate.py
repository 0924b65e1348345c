"""klvae-eval end to end on a tiny model: folder and shard sources, JSON, grid, missing-weight errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.evaluation.data import image_batches
from klvae.evaluation.evaluate import evaluate, main
from klvae.evaluation.metrics import psnr, quantize, ssim, to_unit
from klvae.inference import InferenceVAE
from klvae.interop.formats import read_vae_weights, write_vae
from klvae.modules.vae import KLAutoencoder
from tests.conftest import tiny_ddconfig_dict

TINY_F2 = tiny_ddconfig_dict(levels=2)  # f = 2: 32² images, 16×16 latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = KLAutoencoder.from_ddconfig(TINY_F2, 4)
    torch.save(model.state_dict(), root / "vae.pth")
    ckpt = write_vae(read_vae_weights(root / "vae.pth", ddconfig=TINY_F2), root / "vae.safetensors")
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


def test_cli_writes_json_and_grid_and_reports_missing_inception(setup, tmp_path, monkeypatch) -> None:
    root, _, ckpt = setup
    out = tmp_path / "out"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # no Inception in the default place
    main([str(ckpt), "--data", str(root / "imgs"), "--resolution", "32", "--batch-size", "2", "--out", str(out),
          "--lpips", "random", "--grid-k", "2"])  # fmt: skip
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


def test_bad_files_are_skipped_counted_and_listed_never_substituted(setup, tmp_path) -> None:
    # 5 good + 4 corrupt files, as a folder and as a shard: exactly 5 images scored, once each.
    root, _, ckpt = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    samples = []
    for path in sorted((root / "imgs").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
        samples.append((path.name, path.read_bytes()))
    for i in range(4):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG truncated")
        samples.append((f"bad{i}.png", b"\x89PNG truncated"))
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for name, data in [("folder", folder), ("shards", tmp_path / "mixed.tar")]:
        out = tmp_path / name
        assert main([str(ckpt), "--data", str(data), "--resolution", "32", "--batch-size", "3", "--out", str(out),
                     "--lpips", "none", "--inception", "none"]) == 0  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_images"] == 5 and metrics["num_skipped"] == 4, metrics
        assert sorted(s["key"].rsplit(":", 1)[-1] for s in metrics["skipped"]) == [
            "bad0",
            "bad1",
            "bad2",
            "bad3",
        ]
        keys = [json.loads(line)["key"] for line in (out / "per_image.jsonl").read_text().splitlines()]
        assert len(keys) == len(set(keys)) == 5  # no image scored twice


def test_rfid_below_the_minimum_image_count_is_marked_unreliable(setup, monkeypatch) -> None:
    from klvae.evaluation.evaluate import MIN_RFID_IMAGES

    root, model, _ = setup

    class MeanPool(torch.nn.Module):  # a fixed random 2048-d feature map: the point is the count rule
        def __init__(self):
            super().__init__()
            self.proj = torch.randn(3 * 16 * 16, 2048, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 16).flatten(1) @ self.proj

    import klvae.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "inception_features", lambda net, x: net(x))
    # The Frechet distance of two 2048-d Gaussians takes ~20 s on 2 cores; its value is not under test.
    monkeypatch.setattr(ev, "frechet_distance", lambda m1, c1, m2, c2: float(((m1 - m2) ** 2).sum()))
    result = evaluate(InferenceVAE(model), image_batches(str(root / "imgs"), 32, 5), inception=MeanPool())
    m = result.metrics
    assert (
        m["rfid"] is not None
        and m["rfid_unreliable"] is True
        and m["rfid_min_images"] == MIN_RFID_IMAGES == 2048
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # Before: exit 0, the metric skipped and an error logged. A file the user names must exist.
        (
            ["--lpips", "{tmp}/no-vgg.pth"],
            "--lpips '{tmp}/no-vgg.pth': no such file; give the weights file, or --lpips none to skip LPIPS",
        ),
        (["--inception", "{tmp}/no-inception.pt"], "--inception '{tmp}/no-inception.pt': no such file"),
        (
            ["--inception", "{tmp}/not-torchscript.pt"],
            "--inception '{tmp}/not-torchscript.pt' could not be loaded",
        ),
        (["--lpips", "{tmp}/not-torchscript.pt"], "--lpips '{tmp}/not-torchscript.pt': "),
        # Before: a RuntimeError traceback from the PSNR of a 36² input and a 32² reconstruction (f = 2 here).
        (
            ["--resolution", "35"],
            "--resolution 35 is not a multiple of the VAE's downsampling factor 2; use 34 or 36",
        ),
        # Before: torch's RuntimeError from the first .to("cuda").
        (["--device", "cuda"], "--device 'cuda': no CUDA GPU is visible on this machine"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
        # Before: FileExistsError from mkdir.
        (["--out", "{tmp}/not-torchscript.pt"], "--out '{tmp}/not-torchscript.pt' is an existing file"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(setup, tmp_path, capsys, flags, message) -> None:
    from tests.test_errors import one_error_line

    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has a GPU")
    root, _, ckpt = setup
    (tmp_path / "not-torchscript.pt").write_bytes(b"garbage" * 10)
    args = [str(ckpt), "--data", str(root / "imgs"), "--resolution", "32", "--out", str(tmp_path / "out"),
            "--lpips", "none", "--inception", "none"]  # fmt: skip
    assert main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert message.format(tmp=tmp_path) in one_error_line(capsys, "klvae-eval: error: ")
    assert not (tmp_path / "out").exists()  # nothing written before the flags were checked
