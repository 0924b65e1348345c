"""Encoder/Decoder: shapes, LDM state-dict layout, parameter counts, and agreement with diffusers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from klvae.errors import ConfigError
from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.model import AttnBlock, Decoder, Encoder
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder
from klvae.util import instantiate_from_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_autoencoder_downsamples_by_8(tiny_ddconfig):
    vae = KLAutoencoder.from_ddconfig(tiny_ddconfig, embed_dim=4)
    x = torch.randn(2, 3, 32, 48)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, 4, 6)
    recon, _ = vae(x)
    assert recon.shape == x.shape


def test_kl_f8_parameter_counts_match_published_model():
    with torch.device("meta"):  # counts only: no memory, no init time
        encoder, decoder = Encoder(**KL_F8_DDCONFIG), Decoder(**KL_F8_DDCONFIG)
        vae = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, embed_dim=4)
        disc = NLayerDiscriminator()
    assert count(encoder) == 34_163_592
    assert count(decoder) == 49_490_179
    assert count(vae) == 83_653_863
    assert count(vae.quant_conv) + count(vae.post_quant_conv) == 92
    assert count(disc) == 2_765_633


def test_discriminator_gives_30x30_patch_logits():
    assert NLayerDiscriminator()(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def expected_ldm_keys(num_levels: int = 4, num_res_blocks: int = 2) -> set[str]:
    """LDM's kl-f8 layout (CompVis/latent-diffusion ``first_stage_model``), written out independently of the network code."""
    conv = ("weight", "bias")

    def resnet(prefix: str, shortcut: bool) -> list[str]:
        names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
        return [f"{prefix}.{n}.{p}" for n in names for p in conv]

    def mid(prefix: str) -> list[str]:
        keys = resnet(f"{prefix}.mid.block_1", False) + resnet(f"{prefix}.mid.block_2", False)
        return keys + [
            f"{prefix}.mid.attn_1.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in conv
        ]

    widths = [128, 256, 512, 512]
    keys = [f"{m}.{p}" for m in ("quant_conv", "post_quant_conv") for p in conv]
    for side in ("encoder", "decoder"):
        keys += [f"{side}.{n}.{p}" for n in ("conv_in", "norm_out", "conv_out") for p in conv] + mid(side)
    prev = 128
    for i in range(num_levels):
        for j in range(num_res_blocks):
            keys += resnet(f"encoder.down.{i}.block.{j}", shortcut=(j == 0 and prev != widths[i]))
            prev = widths[i]
        if i < num_levels - 1:
            keys += [f"encoder.down.{i}.downsample.conv.{p}" for p in conv]
    prev = 512
    for i in reversed(range(num_levels)):  # decoder.up.3 is the lowest resolution and runs first
        for j in range(num_res_blocks + 1):
            keys += resnet(f"decoder.up.{i}.block.{j}", shortcut=(j == 0 and prev != widths[i]))
            prev = widths[i]
        if i > 0:
            keys += [f"decoder.up.{i}.upsample.conv.{p}" for p in conv]
    return set(keys)


def test_state_dict_has_exact_ldm_layout():
    with torch.device("meta"):
        vae = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, embed_dim=4)
    keys = set(vae.state_dict())
    assert len(keys) == 248
    assert keys == expected_ldm_keys()
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)  # lowest resolution, widest
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)


# --------------------------------------------------------------------------- diffusers as an oracle
def diffusers_to_ldm(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename diffusers' AutoencoderKL tensors to LDM's layout (written here, independent of klvae.interop.keys)."""
    out = {}
    for key, value in state.items():
        k = key
        for a, b in [
            ("mid_block.resnets.0", "mid.block_1"),
            ("mid_block.resnets.1", "mid.block_2"),
            ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
            ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
            ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
            ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
            ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
            ("conv_norm_out", "norm_out"),
            ("conv_shortcut", "nin_shortcut"),
            ("downsamplers.0.conv", "downsample.conv"),
            ("upsamplers.0.conv", "upsample.conv"),
            (".resnets.", ".block."),
            ("down_blocks.", "down."),
        ]:
            k = k.replace(a, b)
        if k.startswith("decoder.up_blocks."):
            parts = k.split(".")
            parts[1], parts[2] = "up", str(num_levels - 1 - int(parts[2]))
            k = ".".join(parts)
        if ".mid.attn_1." in k and k.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[k] = value
    return out


def test_ldm_state_dict_loads_strictly_and_matches_diffusers(tiny_ddconfig):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    vae = KLAutoencoder.from_ddconfig(tiny_ddconfig, embed_dim=4).eval()
    vae.load_state_dict(diffusers_to_ldm(reference.state_dict(), 4), strict=True)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = vae.encode(x)
        theirs = reference.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(vae.decode(z), reference.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(8, norm_num_groups=4)
    x = torch.randn(2, 8, 5, 3)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8**0.5, dim=-1)  # (B, N_q, N_k)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
    torch.testing.assert_close(block(x), x + block.proj_out(attended), rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_bottom_only():
    from klvae.modules.model import Downsample

    down = Downsample(2)
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(
        down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("norm_num_groups", 3, "norm_num_groups=3"),
        ("resolution", 30, "resolution=30"),
        ("ch_mult", [], "ch_mult"),
        ("ch_mult", [1, 0], "ch_mult"),
        ("num_res_blocks", 0, "num_res_blocks"),
        ("dropout", 1.5, "dropout"),
        ("z_channels", -1, "z_channels"),
    ],
)
def test_invalid_ddconfig_value_raises_naming_it(tiny_ddconfig, key, value, message):
    tiny_ddconfig[key] = value
    with pytest.raises(ValueError, match=message):
        KLAutoencoder.from_ddconfig(tiny_ddconfig, embed_dim=4)


def test_misspelled_ddconfig_key_raises_naming_it(tiny_ddconfig):
    tiny_ddconfig["chmult"] = tiny_ddconfig.pop("ch_mult")
    with pytest.raises(ConfigError, match="chmult"):
        KLAutoencoder.from_ddconfig(tiny_ddconfig, embed_dim=4)


def test_gradient_checkpointing_gives_identical_gradients(tiny_ddconfig):
    torch.manual_seed(0)
    plain = instantiate_from_config({"target": "klvae.modules.model.Decoder", "params": tiny_ddconfig})
    ckpt = instantiate_from_config(
        {"target": "klvae.modules.model.Decoder", "params": {**tiny_ddconfig, "gradient_checkpointing": True}}
    )
    ckpt.load_state_dict(plain.state_dict())
    z = torch.randn(2, 4, 4, 4)
    plain(z).square().sum().backward()
    ckpt(z).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
