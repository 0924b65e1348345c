"""SD3/FLUX.1-shaped (16 channels, no quant convs) and SDXL-shaped (4 channels, quant convs) VAEs: a real
diffusers ``AutoencoderKL`` in, a few training iterations, back out to diffusers and to LDM layout, and
diffusers' own loaders (``from_pretrained``, ``from_single_file`` offline) reproduce klvae's encode/decode."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from klvae.inference import InferenceVAE
from klvae.interop.formats import read_vae_weights, write_vae
from klvae.models.autoencoder import AutoencoderKL
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder
from tests.conftest import TINY_LOSSCONFIG
from tests.models.test_autoencoder import fit

# (latent channels, quant convs): FLUX.1/SD3's family and SDXL's (= SD's kl-f8) family.
FAMILIES = {"flux_sd3_c16": (16, False), "sdxl_c4": (4, True)}


def _diffusers_vae(latent: int, quant: bool) -> DiffusersAutoencoderKL:
    torch.manual_seed(0)
    return DiffusersAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1,
        use_quant_conv=quant, use_post_quant_conv=quant,
    ).eval()  # fmt: skip


def _assert_same_codec(theirs: DiffusersAutoencoderKL, encode, decode) -> None:
    """diffusers' encode (posterior mean) and decode equal klvae's to 1e-4."""
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    with torch.no_grad():
        mean = theirs.encode(x).latent_dist.mean
        torch.testing.assert_close(encode(x), mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode(mean), theirs.decode(mean).sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_vae_round_trip_through_training(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    latent, quant = FAMILIES[family]
    source = _diffusers_vae(latent, quant)
    source.save_pretrained(tmp_path / "source")

    # In, for inference: strict, with its factors, the same numbers.
    vae = InferenceVAE.from_pretrained(tmp_path / "source")
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.1)
    assert vae.model.network.use_quant_conv is quant and vae.model.network.use_post_quant_conv is quant
    assert vae.model.network.embed_dim == latent
    _assert_same_codec(source, vae.encode, vae.decode)

    # In, for training: warm start with the network read from the folder (ddconfig null).
    model = AutoencoderKL(
        None, copy.deepcopy(TINY_LOSSCONFIG), embed_dim=latent, ckpt_path=str(tmp_path / "source")
    )
    keys = set(k for k in model.state_dict() if not k.startswith("loss."))
    assert any(k.startswith("quant_conv.") for k in keys) is quant
    assert any(k.startswith("post_quant_conv.") for k in keys) is quant
    assert len(keys) == len(source.state_dict())  # strict: every tensor of the source, nothing more
    _assert_same_codec(source, lambda x: model.encode(x).mean, model.decode)
    before = model.decoder.conv_out.weight.detach().clone()
    trainer = fit(model, 4)
    assert not torch.equal(before, model.decoder.conv_out.weight)  # it trained
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model.eval()

    # Out: diffusers folder and LDM-layout file, both read by diffusers' own loaders.
    weights = read_vae_weights(tmp_path / "last.ckpt")
    network = weights.network
    assert (network.use_quant_conv, network.use_post_quant_conv, network.embed_dim) == (quant, quant, latent)
    write_vae(weights, tmp_path / "out", scaling_factor=0.3611, shift_factor=0.1159)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_quant_conv"] is quant and config["use_post_quant_conv"] is quant
    assert (config["scaling_factor"], config["shift_factor"], config["latent_channels"]) == (
        0.3611,
        0.1159,
        latent,
    )
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    _assert_same_codec(theirs, lambda x: model.encode(x).mean, model.decode)

    write_vae(weights, tmp_path / "vae.safetensors")
    single = DiffusersAutoencoderKL.from_single_file(
        str(tmp_path / "vae.safetensors"), config=str(tmp_path / "out"), local_files_only=True
    ).eval()
    _assert_same_codec(single, lambda x: model.encode(x).mean, model.decode)
    assert read_vae_weights(tmp_path / "vae.safetensors").network == weights.network


def test_config_and_weights_disagreeing_on_quant_convs_is_named(tmp_path, tiny_lossconfig) -> None:
    _diffusers_vae(16, False).save_pretrained(tmp_path / "flux_like")
    with pytest.raises(ValueError, match="use_quant_conv: file False vs config True"):
        AutoencoderKL(
            None, tiny_lossconfig, embed_dim=16, ckpt_path=str(tmp_path / "flux_like"), use_quant_conv=True
        )
    config = json.loads((tmp_path / "flux_like" / "config.json").read_text())
    (tmp_path / "flux_like" / "config.json").write_text(json.dumps({**config, "use_quant_conv": True}))
    with pytest.raises(ValueError, match="use_quant_conv=True but its tensors have use_quant_conv=False"):
        read_vae_weights(tmp_path / "flux_like")


def test_no_quant_conv_needs_embed_dim_equal_to_z_channels(tiny_ddconfig) -> None:
    with pytest.raises(ValueError, match="use_quant_conv: false needs embed_dim == ddconfig.z_channels"):
        NetworkConfig.from_params({**tiny_ddconfig, "z_channels": 16}, 4, use_quant_conv=False)


def test_decoder_only_without_quant_convs_trains_only_the_decoder(tiny_ddconfig, tiny_lossconfig) -> None:
    ddconfig = {**tiny_ddconfig, "z_channels": 16}
    model = AutoencoderKL(
        ddconfig, tiny_lossconfig, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False,
        train_decoder_only=True, ema_decay=0.99,
    )  # fmt: skip
    assert not any(
        k.startswith(("quant_conv.", "post_quant_conv.", "ema.quant_conv")) for k in model.state_dict()
    )
    trainable = {id(p) for p in model._trainable_codec_parameters()}
    assert trainable == {id(p) for p in model.decoder.parameters()}


# Published counts of the 4-channel kl-f8 network (SD/SDXL VAE): encoder, decoder, both quant convs.
KL_F8_ENCODER, KL_F8_DECODER, KL_F8_QUANT_CONVS = 34_163_592, 49_490_179, 92


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts_4_and_16_channels() -> None:
    with torch.device("meta"):
        c4 = KLAutoencoder.from_ddconfig({}, 4)  # defaults: kl-f8
        c16 = KLAutoencoder.from_ddconfig({"z_channels": 16}, 16)
        c16_bare = KLAutoencoder.from_ddconfig(
            {"z_channels": 16}, 16, use_quant_conv=False, use_post_quant_conv=False
        )
    assert (_count(c4.encoder), _count(c4.decoder)) == (KL_F8_ENCODER, KL_F8_DECODER)
    assert _count(c4.quant_conv) + _count(c4.post_quant_conv) == KL_F8_QUANT_CONVS
    # 16 channels only widen the encoder's conv_out (512 -> 2·16) and the decoder's conv_in (16 -> 512).
    encoder16 = KL_F8_ENCODER + 512 * 9 * 2 * (16 - 4) + 2 * (16 - 4)
    decoder16 = KL_F8_DECODER + 512 * 9 * (16 - 4)
    assert (_count(c16.encoder), _count(c16.decoder)) == (encoder16, decoder16) == (34_274_208, 49_545_475)
    # quant_conv 32->32 (1024 + 32), post_quant_conv 16->16 (256 + 16).
    assert _count(c16.quant_conv) + _count(c16.post_quant_conv) == 1_328
    assert _count(c16_bare) == 34_274_208 + 49_545_475 == 83_819_683  # SD3 / FLUX.1's VAE
    assert len(c16_bare.state_dict()) == len(c4.state_dict()) - 4 == 244


@pytest.mark.parametrize(
    ("recipe", "family"), [("finetune_flux_vae.yaml", "flux_sd3_c16"), ("finetune_sdxl_vae.yaml", "sdxl_c4")]
)
def test_fine_tune_recipes_read_their_family_from_a_diffusers_folder(
    recipe: str, family: str, tmp_path
) -> None:
    from pathlib import Path

    from klvae.util import instantiate_from_config, load_config

    latent, quant = FAMILIES[family]
    source = _diffusers_vae(latent, quant)
    source.save_pretrained(tmp_path / "vae")
    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(
        [configs / recipe],
        [
            f"model.params.ckpt_path={tmp_path / 'vae'}",
            "model.params.lossconfig.params.perceptual_backbone=random",
        ],
    )
    model = instantiate_from_config(cfg.model)
    assert model.network.z_channels == latent and model.network.use_quant_conv is quant
    _assert_same_codec(source, lambda x: model.encode(x).mean, model.decode)
    if family == "flux_sd3_c16":  # a 4-channel file given to the 16-channel recipe: one clear line
        _diffusers_vae(4, True).save_pretrained(tmp_path / "sd")
        cfg.model.params.ckpt_path = str(tmp_path / "sd")
        with pytest.raises(ValueError, match="disagree on the quant convs"):
            instantiate_from_config(cfg.model)


def test_latent_stats_give_both_factors_and_export_writes_them(tmp_path) -> None:
    """klvae-latent-stats on a 16-channel VAE, then klvae-export --latent-stats: diffusers' (z - shift) * scale
    of the exported folder has mean 0 and std 1 on the same images."""
    import numpy as np
    from PIL import Image

    from klvae.evaluation.data import image_batches
    from klvae.evaluation.latent_stats import main as stats_main
    from klvae.interop.export import main as export_main

    _diffusers_vae(16, False).save_pretrained(tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    stats_args = ["--data", str(tmp_path / "imgs"), "--resolution", "32", "--batch-size", "2", "--mode"]
    stats_main([str(tmp_path / "vae"), *stats_args, "--out", str(tmp_path / "stats.json")])
    stats = json.loads((tmp_path / "stats.json").read_text())
    export_main([str(tmp_path / "vae"), "--format", "diffusers", "--out", str(tmp_path / "out"),
                 "--latent-stats", str(tmp_path / "stats.json")])  # fmt: skip
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert (theirs.config.scaling_factor, theirs.config.shift_factor) == (
        stats["scaling_factor"],
        stats["shift_factor"],
    )
    with torch.no_grad():
        z = torch.cat(
            [theirs.encode(x).latent_dist.mean for x, _ in image_batches(str(tmp_path / "imgs"), 32, 2)]
        )
    normalised = (z.double() - theirs.config.shift_factor) * theirs.config.scaling_factor
    assert abs(float(normalised.mean())) < 1e-5 and abs(float(normalised.std()) - 1) < 1e-5
    export_main([str(tmp_path / "vae"), "--format", "diffusers", "--out", str(tmp_path / "sdxl_style"),
                 "--latent-stats", str(tmp_path / "stats.json"), "--no-shift"])  # fmt: skip
    assert "shift_factor" not in json.loads((tmp_path / "sdxl_style" / "config.json").read_text())


def test_network_config_is_built_from_the_yaml_keys_and_written_back() -> None:
    ddconfig = {**KL_F8_DDCONFIG, "norm_num_groups": 32}
    network = NetworkConfig.from_params(ddconfig, 4)
    assert network == NetworkConfig() and network.ddconfig() == ddconfig  # kl-f8 defaults, keys as given
    assert NetworkConfig.from_params({}, 4).ddconfig() == KL_F8_DDCONFIG
    with pytest.raises(ValueError, match="embed_dim must be a positive integer"):
        NetworkConfig.from_params({}, 0)
    with pytest.raises(ValueError, match="double_z must be true"):
        NetworkConfig.from_params({"double_z": False}, 4)


def test_main_py_trains_the_16_channel_recipe_and_exports_it_for_diffusers(tmp_path, photos) -> None:
    # The shipped from-scratch recipe as a user runs it (main.py, folder data), shrunk to 32² and 2 levels,
    # through disc_start and validation, then --export diffusers: diffusers' own loader must agree.
    from klvae.training.cli import main
    from tests.cli_helpers import only_run_dir

    configs = Path(__file__).resolve().parents[2] / "configs"
    net = "model.params.ddconfig."
    status = main([
        "-b", str(configs / "autoencoder_kl_f8_c16.yaml"), str(configs / "autoencoder_kl_f8_folder.yaml"),
        "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test", "--export", "diffusers",
        f"{net}ch=8", f"{net}ch_mult=[1,2]", f"{net}num_res_blocks=1", f"{net}resolution=32",
        f"{net}norm_num_groups=4",
        "model.params.lossconfig.params.perceptual_backbone=random",
        "model.params.lossconfig.params.disc_start=2", "model.params.lossconfig.params.disc_ndf=8",
        f"data.params.train_dir={photos}", f"data.params.val_dir={photos}", "data.params.size=32",
        "data.params.min_size=32", "data.params.batch_size=2", "data.params.num_workers=0",
        "lightning.max_iterations=4", "lightning.trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert status == 0
    run = only_run_dir(tmp_path / "logs")
    folder = run / "export" / "diffusers"
    config = json.loads((folder / "config.json").read_text())
    assert (config["latent_channels"], config["use_quant_conv"], config["use_post_quant_conv"]) == (
        16,
        False,
        False,
    )
    assert config["scaling_factor"] > 0 and "shift_factor" in config  # measured on the validation images
    ours = InferenceVAE.from_pretrained(folder)
    theirs = DiffusersAutoencoderKL.from_pretrained(folder).eval()
    _assert_same_codec(theirs, lambda x: ours.encode(x), lambda z: ours.decode(z))


def test_ldm_knobs_load_at_ldm_values_only(tiny_ddconfig) -> None:
    # LDM configs may spell out Decoder knobs no published VAE changes; other values are refused, named.
    from klvae.errors import ConfigError

    spelled = {**tiny_ddconfig, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False}
    assert NetworkConfig.from_params(spelled, 4) == NetworkConfig.from_params(tiny_ddconfig, 4)
    assert "tanh_out" not in NetworkConfig.from_params(spelled, 4).ddconfig()
    for key, value in (("tanh_out", True), ("give_pre_end", True), ("resamp_with_conv", False)):
        with pytest.raises(ConfigError, match=f"ddconfig.{key}={value} is not supported"):
            NetworkConfig.from_params({**tiny_ddconfig, key: value}, 4)


def test_the_lightning_module_is_the_network_class(tiny_ddconfig, tiny_lossconfig) -> None:
    # One implementation of encode/decode: AutoencoderKL extends KLAutoencoder, same modules and keys.
    model = AutoencoderKL(tiny_ddconfig, tiny_lossconfig, embed_dim=4)
    assert isinstance(model, KLAutoencoder)
    assert AutoencoderKL.encode is KLAutoencoder.encode and AutoencoderKL.decode is KLAutoencoder.decode
    plain = KLAutoencoder.from_ddconfig(tiny_ddconfig, 4)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith(("loss.", "ema."))}


# VA-VAE's f16d32 network (hustvl/LightningDiT, tokenizer/configs/vavae_f16d32.yaml): LDM's AutoencoderKL with
# ch_mult [1, 1, 2, 2, 4], z_channels = embed_dim = 32, quant convs, attention at resolution 16 (the last level).
VAVAE_F16D32 = {"z_channels": 32, "ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16], "dropout": 0.0}


def test_full_size_va_vae_network_is_read_from_its_tensors() -> None:
    with torch.device("meta"):
        vavae = KLAutoencoder.from_ddconfig(VAVAE_F16D32, 32)
    from klvae.interop.configs import network_from_state_dict

    assert network_from_state_dict(vavae.state_dict()) == vavae.network
    assert vavae.network.downsampling == 16
    # LDM puts an AttnBlock after every ResnetBlock of the 16x16 level: 2 in the encoder, 3 in the decoder.
    attention = {k.rsplit(".", 2)[0] for k in vavae.state_dict() if ".attn." in k}
    assert attention == {"encoder.down.4.attn.0", "encoder.down.4.attn.1", "decoder.up.4.attn.0",
                         "decoder.up.4.attn.1", "decoder.up.4.attn.2"}  # fmt: skip


def test_va_vae_training_checkpoint_loads_with_its_extra_keys_tolerated(tmp_path, tiny_lossconfig) -> None:
    # VA-VAE's training module (LightningDiT vavae/ldm/models/autoencoder.py) also holds the frozen DINOv2
    # (foundation_model.model.*), the VF projection (linear_proj.weight, 32 -> 1024 1x1 with reverse_proj) and
    # LDM's loss (loss.*); its tokenizer loads the .pt non-strictly. klvae reads the network strictly, keeps
    # loss.* for a warm start, and leaves the rest. Shrunk to ch 32 (GroupNorm(32) divides every width).
    ddconfig = {**VAVAE_F16D32, "ch": 32, "num_res_blocks": 1}
    source = AutoencoderKL(ddconfig, tiny_lossconfig, embed_dim=32)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    state = {
        **source.state_dict(),
        "foundation_model.model.patch_embed.proj.weight": torch.randn(16, 3, 14, 14),
        "foundation_model.model.cls_token": torch.randn(1, 1, 16),
        "linear_proj.weight": torch.randn(1024, 32, 1, 1),
    }
    path = tmp_path / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": state, "epoch": 49, "global_step": 100000}, path)

    vae = InferenceVAE.from_pretrained(path)
    network = vae.model.network
    assert (network.ch_mult, network.attn_resolutions, network.z_channels, network.embed_dim) == (
        (1, 1, 2, 2, 4), (16,), 32, 32,
    )  # fmt: skip
    assert network.use_quant_conv and network.use_post_quant_conv
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    source.eval()
    with torch.no_grad():
        mean = source.encode(x).mean  # (1, 32, 4, 6)
        torch.testing.assert_close(vae.encode(x), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(mean), source.decode(mean), rtol=1e-5, atol=1e-5)

    model = AutoencoderKL(
        None, tiny_lossconfig, embed_dim=32, ckpt_path=str(path)
    )  # network from the tensors
    assert model.network == source.network
    assert torch.equal(model.loss.logvar, source.loss.logvar.detach())
    assert not any(k.startswith(("foundation_model.", "linear_proj.")) for k in model.state_dict())
