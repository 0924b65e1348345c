"""Every shipped config loads, and its sections build (model at tiny size, data and lightning validated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from klvae.util import _check_arguments, get_obj_from_str, instantiate_from_config, load_config, to_container

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"autoencoder_kl_f8.yaml", "autoencoder_kl_f8_ldm.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds(path, tiny_ddconfig):
    cfg = load_config([path])
    if path.name.startswith("overlay_"):  # only adds to a recipe's blocks: loaded on top of them below
        return
    if "model" in cfg:
        params = cfg.model.params
        # Full size would work too; tiny keeps the test fast. Weights are not needed for the structure.
        # (a null ddconfig, read from ckpt_path in the fine-tune recipe, gets the tiny one)
        # (z_channels stays the recipe's: 16-channel recipes tie it to embed_dim without quant convs)
        params.ddconfig = OmegaConf.merge(
            params.ddconfig or {}, {**tiny_ddconfig, "z_channels": params.embed_dim}
        )
        params.lossconfig.params.perceptual_backbone = "random"
        _tiny_backbones(params.lossconfig)  # VF loss / DINO discriminator: tiny random ViTs, no weights
        if "ckpt_path" in params.keys():  # noqa: SIM118 (`in` skips a mandatory `???`, as in the fine-tune recipe)
            params.ckpt_path = None
        model = instantiate_from_config(cfg.model)
        assert model.loss.disc_start >= 0
    if "data" in cfg:
        data = to_container(OmegaConf.to_container(cfg.data, resolve=False))
        target = get_obj_from_str(data["target"])
        _check_arguments(data["target"], target, data.get("params") or {})
    if "lightning" in cfg:
        from klvae.training.trainer import plan_trainer

        plan_trainer(to_container(cfg.lightning), gpus=None, num_nodes=None, precision=None, accumulate=1)


def _tiny_backbones(node) -> None:
    """Every FrozenViT block in a config becomes a tiny random ViT of the same family (a test has no weights)."""
    from tests.conftest import tiny_backbone_dict

    if isinstance(node, DictConfig):
        if node.get("target") == "klvae.modules.backbones.FrozenViT":
            node.params = tiny_backbone_dict(
                node.params.model_name, model_kwargs={"depth": 12}
            )  # blocks 2..11
            return
        for key in node:
            _tiny_backbones(node[key])


def test_default_recipe_values():
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


def test_every_shipped_recipe_points_at_data_from_the_command_line():
    """The short path (one-source ``train.shards``) and list-index overrides, as the README shows them."""
    for name in (
        "autoencoder_kl_f8.yaml",
        "autoencoder_kl_f8_c16.yaml",
        "finetune_sd_vae_decoder.yaml",
        "finetune_sdxl_vae.yaml",
        "finetune_flux_vae.yaml",
        "finetune_flux2_vae.yaml",
        "finetune_eqvae.yaml",
    ):
        cfg = load_config(
            [CONFIGS[0].parent / name],
            [
                "data.params.train.shards=/d/train-{000000..000009}.tar",
                "data.params.validation.shards=/d/val.tar",
            ],
        )
        assert cfg.data.params.train.shards == "/d/train-{000000..000009}.tar"
        assert cfg.data.params.validation.shards == "/d/val.tar"


def test_folder_overlay_replaces_the_shard_data_block():
    cfg = load_config(
        [CONFIGS[0].parent / "autoencoder_kl_f8.yaml", CONFIGS[0].parent / "autoencoder_kl_f8_folder.yaml"],
        ["data.params.train_dir=/imgs", "data.params.val_dir=null"],
    )
    data = to_container(cfg.data)
    assert data["target"] == "klvae.data.folder.ImageFolderDataModule"
    assert "train" not in data["params"] and "shuffle_buffer" not in data["params"]
    module = instantiate_from_config(data)
    assert module.train_dir == "/imgs" and module.val_dir is None
    assert cfg.model.params.ddconfig.ch == 128  # the model block is untouched


def test_finetune_recipe_reads_the_network_from_the_checkpoint():
    cfg = load_config([CONFIGS[0].parent / "finetune_sd_vae_decoder.yaml"])
    assert cfg.model.params.ddconfig is None and cfg.model.params.ckpt_use_ema is None


def test_16_channel_recipes_have_no_quant_convs():
    scratch = load_config([CONFIGS[0].parent / "autoencoder_kl_f8_c16.yaml"]).model.params
    assert (scratch.ddconfig.z_channels, scratch.embed_dim) == (16, 16)
    assert scratch.use_quant_conv is False and scratch.use_post_quant_conv is False
    assert scratch.ddconfig.ch_mult == [1, 2, 4, 4] and scratch.ddconfig.ch == 128
    flux = load_config([CONFIGS[0].parent / "finetune_flux_vae.yaml"]).model.params
    assert flux.ddconfig is None and flux.embed_dim == 16 and flux.train_decoder_only is True
    assert flux.use_quant_conv is False and flux.use_post_quant_conv is False


def test_flux2_recipe_is_a_decoder_only_32_channel_fine_tune_with_quant_convs():
    flux2 = load_config([CONFIGS[0].parent / "finetune_flux2_vae.yaml"]).model.params
    assert flux2.ddconfig is None and flux2.embed_dim == 32 and flux2.train_decoder_only is True
    assert flux2.use_quant_conv is True and flux2.use_post_quant_conv is True  # checked against ckpt_path


def test_sdxl_recipe_is_the_decoder_only_kl_f8_fine_tune():
    sdxl = load_config([CONFIGS[0].parent / "finetune_sdxl_vae.yaml"]).model.params
    assert sdxl.ddconfig is None and sdxl.embed_dim == 4 and sdxl.train_decoder_only is True
    assert "use_quant_conv" not in sdxl  # taken from the checkpoint (SDXL's VAE has them)


def test_vavae_recipe_is_lightningdits():
    """Values of hustvl/LightningDiT vavae/configs/f16d32_vfdinov2.yaml and its loss (cited in the file)."""
    cfg = load_config([CONFIGS[0].parent / "vavae_f16d32.yaml"])
    params = cfg.model.params
    loss = params.lossconfig.params
    vf = loss.terms.vf.params
    assert (params.embed_dim, params.ddconfig.z_channels, list(params.ddconfig.ch_mult)) == (
        32,
        32,
        [1, 1, 2, 2, 4],
    )
    assert list(params.ddconfig.attn_resolutions) == [16] and params.ddconfig.num_res_blocks == 2
    assert (loss.disc_start, loss.kl_weight, loss.disc_weight, loss.pixel_loss, loss.perceptual_weight) == (
        5001, 1e-6, 0.5, "l1", 1.0)  # fmt: skip
    assert (vf.weight, vf.adaptive, vf.cos_margin, vf.distmat_margin, vf.reverse_proj) == (
        0.1,
        True,
        0.5,
        0.25,
        True,
    )
    assert vf.backbone.params.model_name == "vit_large_patch14_dinov2.lvd142m"
    assert not vf.backbone.params.normalize_input  # VA-VAE feeds DINOv2 [-1, 1] images
    assert cfg.model.base_learning_rate * 8 * 4 * cfg.data.params.batch_size == pytest.approx(1e-4)


def test_vf_recipe_uses_the_dino_discriminator_with_lecam():
    cfg = load_config([CONFIGS[0].parent / "autoencoder_kl_f8_c16_vf.yaml"])
    loss = cfg.model.params.lossconfig.params
    assert loss.discriminator_config.target == "klvae.modules.dino_discriminator.DinoDiscriminator"
    assert loss.lecam_weight > 0 and loss.r1_gamma if "r1_gamma" in loss else True
    assert loss.terms.vf.params.latent_channels == cfg.model.params.embed_dim == 16


@pytest.mark.parametrize(
    "recipe", ["finetune_sdxl_vae.yaml", "finetune_flux_vae.yaml", "finetune_flux2_vae.yaml"]
)
def test_bucket_overlay_turns_a_finetune_recipe_into_a_bucketed_1024_phase(recipe):
    from klvae.data.phases import PhaseSchedule
    from klvae.perf.options import parse_optimizations

    cfg = load_config(
        [CONFIGS[0].parent / recipe, CONFIGS[0].parent / "overlay_buckets_1024.yaml"],
        [
            "data.params.train.shards=/d/train-{000000..000009}.tar",
            "data.params.validation.shards=/d/val.tar",
        ],
    )
    data = instantiate_from_config(to_container(cfg.data))  # a WebDataModule; shards are read at setup
    assert isinstance(data.phases, PhaseSchedule) and data.phases.starts == (0, 240000)
    assert [(p.size, p.batch_size) for p in data.phases] == [(256, 12), (1024, 2)]
    assert data.phases.starts[-1] < cfg.lightning.max_iterations  # the 1024² phase runs
    assert data.train_transforms[1].shapes[0] == (1408, 704) and len(data.train_transforms[1].shapes) == 13
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in data.image_shapes())  # also FLUX.2's 8 x patch 2
    assert data.val_transform.shapes == data.train_transforms[1].shapes  # validation at 1024² buckets
    opts = parse_optimizations(to_container(cfg.model.params.optimizations))
    assert opts.compile_dynamic is True and opts.gradient_checkpointing is True
    assert cfg.model.params.train_decoder_only is True and cfg.data.params.min_size == 1024
