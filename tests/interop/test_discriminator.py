"""Discriminator weights on their own: klvae-export --include-discriminator, and disc_ckpt_path for any
discriminator type, with every key that does not fit named."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from klvae.errors import ConfigError
from klvae.interop.discriminator import discriminator_path_for, read_discriminator_weights
from klvae.interop.export import main
from klvae.interop.formats import read_vae_weights
from klvae.models.autoencoder import AutoencoderKL
from tests.conftest import TINY_LOSSCONFIG, tiny_backbone_config, tiny_ddconfig_dict

TINY = tiny_ddconfig_dict(levels=2)


def dino_lossconfig() -> dict:
    config = copy.deepcopy(TINY_LOSSCONFIG)
    params = config["params"]
    del params["disc_num_layers"], params["disc_ndf"]
    params["discriminator_config"] = {
        "target": "klvae.modules.dino_discriminator.DinoDiscriminator",
        "params": {"backbone": tiny_backbone_config("vit_small_patch16_224.dino"), "blocks": [1, -1]},
    }
    return config


def save_run(model: AutoencoderKL, path) -> None:
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize("kind", ["patchgan", "dino"])
def test_export_includes_the_discriminator_and_a_new_run_warm_starts_from_it(tmp_path, kind):
    lossconfig = copy.deepcopy(TINY_LOSSCONFIG) if kind == "patchgan" else dino_lossconfig()
    torch.manual_seed(0)
    trained = AutoencoderKL(ddconfig=TINY, lossconfig=lossconfig, embed_dim=4)
    with torch.no_grad():  # a discriminator that differs from any fresh initialisation
        for p in trained.loss.discriminator.parameters():
            p.add_(torch.randn_like(p))
    save_run(trained, tmp_path / "last.ckpt")
    out = tmp_path / "vae.safetensors"
    assert main([str(tmp_path / "last.ckpt"), "--out", str(out), "--include-discriminator"]) == 0
    assert not any(
        k.startswith("loss.") for k in read_vae_weights(out).state_dict
    )  # the export: network only
    disc_file = discriminator_path_for(out)
    assert disc_file.name == "vae.discriminator.safetensors"
    weights, recorded = read_discriminator_weights(disc_file)
    assert recorded["target"].endswith("DinoDiscriminator" if kind == "dino" else "NLayerDiscriminator")
    for source in (disc_file, tmp_path / "last.ckpt"):  # the shared file, or the training checkpoint itself
        torch.manual_seed(1)
        fresh = AutoencoderKL(ddconfig=TINY, lossconfig=lossconfig, embed_dim=4, disc_ckpt_path=str(source))
        expected = trained.loss.discriminator.state_dict()
        got = fresh.loss.discriminator.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_discriminator_of_another_type_is_named_key_by_key(tmp_path):
    torch.manual_seed(0)
    save_run(
        AutoencoderKL(ddconfig=TINY, lossconfig=TINY_LOSSCONFIG, embed_dim=4), tmp_path / "patchgan.ckpt"
    )
    with pytest.raises(
        ConfigError, match=r"does not fit the configured discriminator.*missing \(first: \['heads\."
    ):
        AutoencoderKL(ddconfig=TINY, lossconfig=dino_lossconfig(), embed_dim=4,
                      disc_ckpt_path=str(tmp_path / "patchgan.ckpt"))  # fmt: skip
    bigger = copy.deepcopy(TINY_LOSSCONFIG)
    bigger["params"]["disc_ndf"] = 16
    with pytest.raises(
        ConfigError,
        match=r"13 of another shape.*main\.0\.weight: file \(8, 3, 4, 4\) vs config \(16, 3, 4, 4\)",
    ):
        AutoencoderKL(
            ddconfig=TINY, lossconfig=bigger, embed_dim=4, disc_ckpt_path=str(tmp_path / "patchgan.ckpt")
        )


def test_a_file_without_a_discriminator_is_one_clear_error(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(ConfigError, match="holds no discriminator"):
        read_discriminator_weights(tmp_path / "vae.safetensors")
