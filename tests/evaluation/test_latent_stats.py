"""Latent scale/shift statistics: streaming accuracy on known distributions and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.evaluation.latent_stats import LatentStats, compute_latent_stats, main
from klvae.inference import InferenceVAE
from klvae.modules.vae import KLAutoencoder
from tests.conftest import tiny_ddconfig_dict

TINY_F2 = tiny_ddconfig_dict(levels=2)  # f = 2: 32² images, 16×16 latents


def test_known_gaussian_gives_scale_and_shift() -> None:
    stats = LatentStats()
    for _ in range(10):
        stats.update(0.5 + 2.0 * torch.randn(8, 4, 16, 16))
    result = stats.result()
    assert abs(result["scaling_factor"] - 0.5) < 0.01 and abs(result["shift_factor"] - 0.5) < 0.02
    assert result["num_values"] == 10 * 8 * 4 * 16 * 16


def test_streaming_equals_one_shot_with_channel_offsets() -> None:
    offsets = torch.tensor([0.0, 1.0, -2.0, 3.0]).reshape(1, 4, 1, 1)
    chunks = [torch.randn(n, 4, 5, 3) * (1 + i) + offsets for i, n in enumerate((1, 7, 3))]
    stats = LatentStats()
    for c in chunks:
        stats.update(c)
    result = stats.result()
    flat = torch.cat(chunks).double()
    assert abs(result["std"] - flat.std().item()) < 1e-10 and abs(result["mean"] - flat.mean().item()) < 1e-12
    per_channel = flat.transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(result["per_channel_mean"], per_channel.mean(1).numpy(), atol=1e-12)
    np.testing.assert_allclose(result["per_channel_std"], per_channel.std(1).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="no images"):
        LatentStats().result()


def test_cli_on_an_image_folder(tmp_path) -> None:
    model = KLAutoencoder.from_ddconfig(TINY_F2, 4)
    torch.save(model.state_dict(), tmp_path / "vae.pth")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "imgs" / f"{i}.png")
    # --mode: statistics of posterior means, so the result is deterministic and checkable.
    ddconfig_file = tmp_path / "vae.safetensors"
    from klvae.interop.formats import read_vae_weights, write_vae

    write_vae(read_vae_weights(tmp_path / "vae.pth", ddconfig=TINY_F2), ddconfig_file)
    main(
        [
            str(ddconfig_file),
            "--data",
            str(tmp_path / "imgs"),
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--mode",
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["num_images"] == 5 and result["statistic"] == "posterior means"
    from klvae.evaluation.data import image_batches

    batches = image_batches(str(tmp_path / "imgs"), 32, 5)
    total = batches.total
    x, _ = next(iter(batches))
    images = x
    z = InferenceVAE(model).encode(images)
    assert total == 5 and abs(result["scaling_factor"] - 1 / z.double().std().item()) < 1e-6
    direct = compute_latent_stats(InferenceVAE(model), [images], sample=True)
    assert direct["std"] > result["std"]  # samples add the posterior variance


def test_batch_norm_statistics_only_for_a_vae_with_a_latent_batch_norm(tmp_path) -> None:
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    plain = compute_latent_stats(InferenceVAE(KLAutoencoder.from_ddconfig(TINY_F2, 4)), [x], sample=True)
    assert "batch_norm" not in plain
    model = KLAutoencoder.from_ddconfig({**TINY_F2, "latent_batch_norm": {}}, 4)
    result = compute_latent_stats(InferenceVAE(model), [x[:2], x[2:]], sample=True)
    from klvae.modules.latent_norm import patchify

    # posterior means whatever `sample` is (float32 encodes of other batch sizes differ by ~1e-7)
    patches = patchify(InferenceVAE(model).encode(x), (2, 2)).double()
    per_channel = patches.transpose(0, 1).reshape(16, -1)
    norm = result["batch_norm"]
    assert norm["num_values_per_channel"] == 3 * 8 * 8 and norm["patch_size"] == [2, 2]
    np.testing.assert_allclose(norm["running_mean"], per_channel.mean(1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(norm["running_var"], per_channel.var(1).numpy(), rtol=1e-5)  # unbiased
    # The CLI refuses a crop the 2x2 patches cannot tile (f = 2: a multiple of 4).
    from klvae.interop.formats import VAEWeights, write_vae

    write_vae(VAEWeights(model.state_dict(), model.network, "x"), tmp_path / "vae.safetensors")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "0.png")
    assert (
        main([str(tmp_path / "vae.safetensors"), "--data", str(tmp_path / "imgs"), "--resolution", "30"]) == 2
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--resolution", "33"],
            "--resolution 33 is not a multiple of the VAE's downsampling factor 2; use 32 or 34",
        ),
        (["--device", "cuda"], "--device 'cuda': no CUDA GPU is visible on this machine"),
        (["--out", "{tmp}"], "--out '{tmp}' is a folder; give the path of the JSON file to write"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message) -> None:
    from klvae.interop.formats import read_vae_weights, write_vae
    from tests.test_errors import one_error_line

    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has a GPU")
    torch.save(KLAutoencoder.from_ddconfig(TINY_F2, 4).state_dict(), tmp_path / "vae.pth")
    ckpt = write_vae(read_vae_weights(tmp_path / "vae.pth", ddconfig=TINY_F2), tmp_path / "vae.safetensors")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "0.png")
    args = [str(ckpt), "--data", str(tmp_path / "imgs"), "--resolution", "32"]
    assert main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert message.format(tmp=tmp_path) in one_error_line(capsys, "klvae-latent-stats: error: ")
