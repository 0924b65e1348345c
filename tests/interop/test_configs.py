"""The network config from tensor shapes and diffusers' config.json, and back (klvae.interop.configs)."""

from __future__ import annotations

import pytest
import torch

from klvae.interop.configs import (
    check_diffusers_compatible,
    diffusers_config,
    network_from_diffusers_config,
    network_from_state_dict,
)
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder
from tests.conftest import tiny_ddconfig_dict

TINY = tiny_ddconfig_dict(levels=2)  # f = 2, widths 8/16 (diffusers block_out_channels [8, 16])


def test_network_inferred_from_shapes() -> None:
    with torch.device("meta"):
        state = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4).state_dict()
    network = network_from_state_dict(state)
    assert network == NetworkConfig() and network.ddconfig() == {**KL_F8_DDCONFIG, "norm_num_groups": 32}
    tiny = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    with pytest.raises(ValueError, match="norm_num_groups"):
        network_from_state_dict(tiny)
    assert network_from_state_dict(tiny, resolution=32, norm_num_groups=4).ddconfig() == TINY
    # A given ddconfig replaces the shapes; embed_dim and the quant convs still come from the tensors.
    c16 = {**TINY, "z_channels": 16}
    bare = KLAutoencoder.from_ddconfig(c16, 16, use_quant_conv=False, use_post_quant_conv=False).state_dict()
    network = network_from_state_dict(bare, ddconfig=c16)
    assert (network.embed_dim, network.use_quant_conv, network.use_post_quant_conv) == (16, False, False)


def test_diffusers_config_round_trip_and_rejections() -> None:
    network = NetworkConfig.from_params(TINY, 4)
    config = diffusers_config(network, scaling_factor=0.3, shift_factor=0.1)
    assert config["block_out_channels"] == [8, 16] and config["shift_factor"] == 0.1
    assert network_from_diffusers_config(config) == network
    assert network_from_diffusers_config(config).ddconfig() == TINY
    flux = NetworkConfig.from_params(
        {**TINY, "z_channels": 16}, 16, use_quant_conv=False, use_post_quant_conv=False
    )
    config = diffusers_config(flux, 0.3611, 0.1159)
    assert config["use_quant_conv"] is False and config["latent_channels"] == 16
    assert network_from_diffusers_config(config) == flux
    with pytest.raises(ValueError, match="act_fn"):
        network_from_diffusers_config({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="use_quant_conv"):
        network_from_diffusers_config({**config, "use_quant_conv": "no"})
    with pytest.raises(ValueError, match="embed_dim"):
        check_diffusers_compatible(NetworkConfig.from_params(TINY, 8))
    with pytest.raises(ValueError, match="attn_resolutions"):
        diffusers_config(NetworkConfig.from_params({**TINY, "attn_resolutions": [16]}, 4), 0.3)
