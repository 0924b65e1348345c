"""LDM <-> klvae <-> diffusers: key mapping, config translation and strict loading, with diffusers as oracle."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import save_file

from klvae.interop.keys import (
    ddconfig_from_diffusers_config,
    ddconfig_from_state_dict,
    detect_layout,
    diffusers_config_from_ddconfig,
    diffusers_to_ldm,
    ldm_to_diffusers,
    load_vae,
)
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder

# diffusers' tiny-model vocabulary: block_out_channels [8, 16], norm_num_groups 4 (f = 2).
TINY = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=4,
)  # fmt: skip


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    # Default init leaves GroupNorm at (1, 0); random values make a wrong mapping visible in outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _diffusers_from(ddconfig: dict, state: dict) -> DiffusersAutoencoderKL:
    config = diffusers_config_from_ddconfig(ddconfig, 4, scaling_factor=0.5)
    config.pop("_class_name")
    model = DiffusersAutoencoderKL(**config)
    model.load_state_dict(ldm_to_diffusers(state), strict=True)
    return model.eval()


def test_full_kl_f8_keys_map_one_to_one_to_diffusers() -> None:
    with torch.device("meta"):
        ours = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4).state_dict()
        config = diffusers_config_from_ddconfig({**KL_F8_DDCONFIG, "norm_num_groups": 32}, 4, 0.18215)
        config.pop("_class_name")
        theirs = DiffusersAutoencoderKL(**config).state_dict()
    assert len(ours) == 248 and len(theirs) == 248
    mapped = ldm_to_diffusers(ours)
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    back = diffusers_to_ldm(mapped)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)
    assert (
        mapped["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape
        == ours["decoder.up.3.upsample.conv.weight"].shape
    )


def test_decoder_level_index_is_reversed() -> None:
    state = _randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict()
    mapped = ldm_to_diffusers(state)
    # up.1 is the lowest resolution in LDM and runs first: diffusers' up_blocks.0.
    assert torch.equal(
        mapped["decoder.up_blocks.0.resnets.0.conv1.weight"], state["decoder.up.1.block.0.conv1.weight"]
    )
    assert torch.equal(
        mapped["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"],
        state["decoder.up.0.block.0.nin_shortcut.weight"],
    )
    assert mapped["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)


def test_diffusers_outputs_match_klvae() -> None:
    ours = _randomized(KLAutoencoder.from_ddconfig(TINY, 4))
    theirs = _diffusers_from(TINY, ours.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ours.encode(x).mean
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(mean).sample, ours.decode(mean), rtol=1e-4, atol=1e-4)


def test_ldm_diffusers_ldm_round_trip_is_exact() -> None:
    state = _randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict()
    back = diffusers_to_ldm(ldm_to_diffusers(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_old_diffusers_attention_names_load() -> None:
    state = ldm_to_diffusers(_randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict())
    old = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in state.items()}
    assert torch.equal(
        diffusers_to_ldm(old)["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
        state["encoder.mid_block.attentions.0.to_q.weight"],
    )


def test_ddconfig_inferred_from_shapes() -> None:
    with torch.device("meta"):
        state = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4).state_dict()
    ddconfig, embed_dim = ddconfig_from_state_dict(state)
    assert embed_dim == 4
    assert ddconfig == {**KL_F8_DDCONFIG, "norm_num_groups": 32}
    tiny = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    with pytest.raises(ValueError, match="norm_num_groups"):
        ddconfig_from_state_dict(tiny)
    assert ddconfig_from_state_dict(tiny, resolution=32, norm_num_groups=4)[0] == TINY


def test_diffusers_config_round_trip_and_rejections() -> None:
    config = diffusers_config_from_ddconfig(TINY, 4, scaling_factor=0.3, shift_factor=0.1)
    assert config["block_out_channels"] == [8, 16] and config["shift_factor"] == 0.1
    assert ddconfig_from_diffusers_config(config) == (TINY, 4)
    with pytest.raises(ValueError, match="act_fn"):
        ddconfig_from_diffusers_config({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="embed_dim"):
        diffusers_config_from_ddconfig(TINY, 8, 0.3)
    with pytest.raises(ValueError, match="attn_resolutions"):
        diffusers_config_from_ddconfig({**TINY, "attn_resolutions": [16]}, 4, 0.3)


def test_detect_layout() -> None:
    state = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    assert detect_layout(state) == "ldm"
    assert detect_layout({"first_stage_model." + k: v for k, v in state.items()}) == "sd"
    assert detect_layout({**state, "loss.logvar": torch.zeros(())}) == "klvae"
    assert detect_layout(ldm_to_diffusers(state)) == "diffusers"
    with pytest.raises(ValueError, match="unrecognised"):
        detect_layout({"foo.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "kind", ["lightning_sd", "bare", "safetensors_ldm", "safetensors_diffusers", "folder"]
)
def test_load_vae_from_every_layout(tmp_path, kind: str) -> None:
    ours = _randomized(KLAutoencoder.from_ddconfig(TINY, 4))
    state = ours.state_dict()
    if kind == "lightning_sd":  # a full SD-style checkpoint: first_stage_model. plus unrelated keys
        path = tmp_path / "sd.ckpt"
        sd = {"first_stage_model." + k: v for k, v in state.items()}
        torch.save({"state_dict": {**sd, "model.diffusion_model.x": torch.zeros(2)}, "global_step": 3}, path)
    elif kind == "bare":
        path = tmp_path / "vae.pth"
        torch.save({**state, "loss.logvar": torch.zeros(())}, path)
    elif kind == "safetensors_ldm":
        path = tmp_path / "vae.safetensors"
        save_file(state, str(path))
    elif kind == "safetensors_diffusers":
        path = tmp_path / "diff.safetensors"
        save_file({k: v.contiguous() for k, v in ldm_to_diffusers(state).items()}, str(path))
    else:
        path = tmp_path / "pipeline"
        _diffusers_from(TINY, state).save_pretrained(path / "vae")
    loaded = load_vae(path, ddconfig=None if kind == "folder" else TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    if kind == "folder":
        assert json.loads((path / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path) -> None:
    state = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys.*decoder\.conv_out\.bias.*unexpected keys.*decoder\.extra\.weight"
    ):
        load_vae(path, ddconfig=TINY)
    wrong = {**TINY, "ch": 16, "norm_num_groups": 4}
    torch.save(KLAutoencoder.from_ddconfig(TINY, 4).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_vae(path, ddconfig=wrong)


def test_unsafe_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": KLAutoencoder.from_ddconfig(TINY, 4).state_dict(), "obj": torch.nn.ReLU()}, path
    )
    with pytest.raises(ValueError, match="weights_only"):
        load_vae(path, ddconfig=TINY)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "absent.ckpt")
