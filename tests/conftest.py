"""Shared fixtures: tiny configs so the whole suite runs on 2 CPU cores in minutes."""

from __future__ import annotations

import os

# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting makes
# them 10-30x slower. Set before torch is imported so subprocesses (main.py runs) inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import copy  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# f = 8 at 32² in: latents 4×4. Widths divisible by norm_num_groups=4.
TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 8,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
    "norm_num_groups": 4,
}

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_ddconfig() -> dict:
    return copy.deepcopy(TINY_DDCONFIG)


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


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Four real scikit-image photographs as 32² PNG files (tests.cli_helpers.write_photos)."""
    from tests.cli_helpers import write_photos

    return write_photos(tmp_path_factory.mktemp("photos"))
