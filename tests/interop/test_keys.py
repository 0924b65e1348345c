"""LDM <-> diffusers tensor names (klvae.interop.keys), with diffusers' own AutoencoderKL as the oracle."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from klvae.interop.configs import diffusers_config
from klvae.interop.keys import (
    LDM_TO_DIFFUSERS,
    diffusers_to_ldm,
    is_diffusers_layout,
    is_ldm_layout,
    ldm_to_diffusers,
    network_tensors,
    rename_key,
    strip_first_stage,
)
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder
from tests.conftest import tiny_ddconfig_dict
from tests.interop.helpers import diffusers_from, randomized

TINY = tiny_ddconfig_dict(levels=2)  # f = 2, widths 8/16 (diffusers block_out_channels [8, 16])


def test_full_kl_f8_keys_map_one_to_one_to_diffusers() -> None:
    with torch.device("meta"):
        ours = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4).state_dict()
        config = diffusers_config(NetworkConfig(), 0.18215)
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
    state = randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict()
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
    ours = randomized(KLAutoencoder.from_ddconfig(TINY, 4))
    theirs = diffusers_from(TINY, ours.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ours.encode(x).mean
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(mean).sample, ours.decode(mean), rtol=1e-4, atol=1e-4)


def test_ldm_diffusers_ldm_round_trip_is_exact() -> None:
    state = randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict()
    back = diffusers_to_ldm(ldm_to_diffusers(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_old_diffusers_attention_names_load() -> None:
    state = ldm_to_diffusers(randomized(KLAutoencoder.from_ddconfig(TINY, 4)).state_dict())
    old = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in state.items()}
    assert torch.equal(
        diffusers_to_ldm(old)["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
        state["encoder.mid_block.attentions.0.to_q.weight"],
    )


def test_every_table_row_is_used_both_ways_on_kl_f8() -> None:
    with torch.device("meta"):
        ours = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4).state_dict()
    levels = len(KL_F8_DDCONFIG["ch_mult"])
    for key in ours:
        renamed = rename_key(key, levels, to_diffusers=True)
        assert rename_key(renamed, levels, to_diffusers=False) == key
    # No dead rows: each LDM prefix of the table names at least one kl-f8 tensor.
    for ldm, _ in LDM_TO_DIFFUSERS:
        head = re.escape(ldm).replace(r"\{P\}", "(encoder|decoder)")
        head = re.sub(r"\\\{[iuj]\\\}", r"\\d+", head)
        assert any(re.match(head, k) for k in ours), ldm


def test_layout_detection_and_prefixes() -> None:
    state = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    sd = {"first_stage_model." + k: v for k, v in state.items()}
    assert is_ldm_layout(state) and is_ldm_layout(sd) and not is_diffusers_layout(state)
    assert is_diffusers_layout(ldm_to_diffusers(state)) and not is_ldm_layout(ldm_to_diffusers(state))
    assert not is_ldm_layout({"foo.weight": torch.zeros(1)})
    # SD's full checkpoint: only the first stage, prefix removed; a bare dict comes back as it is.
    assert set(strip_first_stage({**sd, "model.diffusion_model.x": torch.zeros(1)})) == set(state)
    assert set(strip_first_stage(state)) == set(state)
    run = {**{"ema." + k: v for k, v in state.items()}, **state, "loss.logvar": torch.zeros(())}
    assert set(network_tensors(run)) == set(state) == set(network_tensors(run, "ema."))
