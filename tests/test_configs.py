"""Every shipped config loads, and its sections build (model at tiny size, data and lightning validated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from klvae.util import _check_arguments, get_obj_from_str, instantiate_from_config, load_config, to_container

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"autoencoder_kl_f8.yaml", "autoencoder_kl_f8_ldm.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds(path, tiny_ddconfig):
    cfg = load_config([path])
    if "model" in cfg:
        params = cfg.model.params
        # Full size would work too; tiny keeps the test fast. Weights are not needed for the structure.
        params.ddconfig = OmegaConf.merge(params.ddconfig, tiny_ddconfig)
        params.lossconfig.params.perceptual_backbone = "random"
        if "ckpt_path" in params.keys():  # noqa: SIM118 (`in` skips a mandatory `???`, as in the fine-tune recipe)
            params.ckpt_path = None
        model = instantiate_from_config(cfg.model)
        assert model.loss.disc_start >= 0
    if "data" in cfg:
        data = to_container(OmegaConf.to_container(cfg.data, resolve=False))
        target = get_obj_from_str(data["target"])
        _check_arguments(data["target"], target, data.get("params") or {})
    if "lightning" in cfg:
        from klvae.trainer_setup import plan_trainer

        plan_trainer(to_container(cfg.lightning), gpus=None, num_nodes=None, precision=None, accumulate=1)


def test_seed_recipe_values():
    cfg = load_config([CONFIGS[0].parent / "autoencoder_kl_f8.yaml"])
    loss = cfg.model.params.lossconfig.params
    assert (loss.pixel_loss, loss.perceptual_weight, loss.kl_weight) == ("l2", 0.5, 1e-6)
    assert (loss.disc_loss, loss.disc_start, loss.reduction) == ("hinge", 50001, "sum")
    assert cfg.model.params.update_schedule == "alternate"
    assert cfg.data.params.batch_size == 12 and cfg.data.params.size == 256


def test_ldm_recipe_values():
    cfg = load_config([CONFIGS[0].parent / "autoencoder_kl_f8_ldm.yaml"])
    loss = cfg.model.params.lossconfig.params
    assert (loss.pixel_loss, loss.perceptual_weight, loss.disc_weight) == ("l1", 1.0, 0.5)
    assert cfg.model.params.update_schedule == "every_batch"
    assert cfg.model.params.accumulate_grad_batches == 2
    assert cfg.model.base_learning_rate == 4.5e-6
