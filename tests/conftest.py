"""Shared fixtures: tiny configs so the whole suite runs on 2 CPU cores in minutes."""

from __future__ import annotations

import os

# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting makes
# them 10-30x slower. Set before torch is imported so subprocesses (main.py runs) inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import copy  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Width multipliers of the tiny network by number of resolution levels (f = 2**(levels-1)).
_TINY_CH_MULT = {
    4: [1, 1, 2, 2],  # f = 8 as kl-f8: 32² in, 4×4 latents
    2: [1, 2],  # f = 2, diffusers' tiny-model widths (block_out_channels [8, 16]): 32² in, 16×16 latents
}


def tiny_ddconfig_dict(levels: int = 4, **overrides: Any) -> dict[str, Any]:
    """A fresh tiny LDM ``ddconfig`` (a new dict every call: tests may edit it) for CPU tests.

    Base width 8, one ResnetBlock per level, no attention levels, GroupNorm with 4 groups (every width is
    divisible by 4), nominal resolution 32.

    Args:
        levels: resolution levels; ``4`` (default) is f = 8 (``ch_mult [1, 1, 2, 2]``), ``2`` is f = 2
            (``ch_mult [1, 2]``), for tests that want large latents from small images.
        overrides: any ``ddconfig`` key, e.g. ``z_channels=16`` for the SD3/FLUX.1 latent width (pass
            ``embed_dim=16`` to the model too).
    """
    if levels not in _TINY_CH_MULT:
        raise ValueError(f"tiny_ddconfig_dict: levels must be one of {sorted(_TINY_CH_MULT)}, got {levels!r}")
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 8,
        "ch_mult": list(_TINY_CH_MULT[levels]),
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
        "norm_num_groups": 4,
    }
    ddconfig.update(copy.deepcopy(overrides))
    return ddconfig


# The default tiny network (f = 8), for modules that cannot take a fixture (tests/models/ddp_probe.py).
TINY_DDCONFIG = tiny_ddconfig_dict()

TINY_LOSSCONFIG = {
    "target": "klvae.modules.losses.LPIPSWithDiscriminator",
    "params": {
        "disc_start": 2,
        "kl_weight": 1e-6,
        "pixel_loss": "l2",
        "perceptual_weight": 0.5,
        "perceptual_backbone": "random",
        "disc_num_layers": 2,
        "disc_ndf": 8,
    },
}


def tiny_backbone_dict(
    model_name: str = "vit_small_patch14_dinov2.lvd142m", **overrides: Any
) -> dict[str, Any]:
    """``FrozenViT`` params of a tiny random timm ViT (4 blocks, width 32, 2 heads) for CPU tests.

    ``image_size`` is 4 patches (56 for /14 models, 64 for /16); any key can be overridden, and
    ``model_kwargs`` entries are merged.
    """
    patch = int(re.search(r"patch(\d+)", model_name).group(1))  # timm names carry it: vit_small_patch14_...
    params: dict[str, Any] = {
        "model_name": model_name,
        "allow_random_backbone": True,
        "image_size": 4 * patch,
        "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2},
    }
    model_kwargs = {**params["model_kwargs"], **overrides.pop("model_kwargs", {})}
    params.update(overrides, model_kwargs=model_kwargs)
    return params


def tiny_backbone_config(
    model_name: str = "vit_small_patch14_dinov2.lvd142m", **overrides: Any
) -> dict[str, Any]:
    """:func:`tiny_backbone_dict` as the ``{target, params}`` block a VF loss or DINO discriminator takes."""
    return {
        "target": "klvae.modules.backbones.FrozenViT",
        "params": tiny_backbone_dict(model_name, **overrides),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_ddconfig() -> dict:
    """The default tiny ddconfig (f = 8), fresh per test: :func:`tiny_ddconfig_dict` ``()``."""
    return tiny_ddconfig_dict()


@pytest.fixture
def tiny_lossconfig() -> dict:
    return copy.deepcopy(TINY_LOSSCONFIG)


@pytest.fixture(autouse=True)
def _quiet_and_seeded() -> None:
    torch.manual_seed(0)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """No test reaches W&B's servers; a run directory is never inherited from the environment."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("KLVAE_RUN_DIR", raising=False)


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    """Backbones never find the developer's real Hugging Face weights (tiny test ViTs would not fit them)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Four real scikit-image photographs as 32² PNG files (tests.cli_helpers.write_photos)."""
    from tests.cli_helpers import write_photos

    return write_photos(tmp_path_factory.mktemp("photos"))
