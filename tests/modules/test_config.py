"""NetworkConfig's latent BatchNorm (klvae.modules.config.LatentBatchNormConfig): FLUX.2's defaults, validation
in one place, and the YAML form written back."""

from __future__ import annotations

import pytest

from klvae.errors import ConfigError
from klvae.modules.config import LatentBatchNormConfig, NetworkConfig
from tests.conftest import tiny_ddconfig_dict


def test_empty_mapping_is_flux2s_batch_norm_and_it_is_written_back() -> None:
    network = NetworkConfig.from_params({"z_channels": 32, "latent_batch_norm": {}}, 32)
    # black-forest-labs/flux2 AutoEncoder: bn_eps 1e-4, bn_momentum 0.1, ps [2, 2], affine False.
    assert network.latent_batch_norm == LatentBatchNormConfig((2, 2), 1e-4, 0.1, False)
    written = network.ddconfig()
    assert written["latent_batch_norm"] == {
        "patch_size": [2, 2],
        "eps": 1e-4,
        "momentum": 0.1,
        "affine": False,
    }
    assert NetworkConfig.from_params(written, 32) == network
    # built directly (no YAML keys given), the ddconfig still says so: the network would be wrong without it
    direct = NetworkConfig(z_channels=32, embed_dim=32, latent_batch_norm=LatentBatchNormConfig())
    assert direct.ddconfig()["latent_batch_norm"]["patch_size"] == [2, 2]
    assert "latent_batch_norm" not in direct.network_kwargs()  # not an Encoder/Decoder argument


def test_patch_size_may_be_one_number() -> None:
    assert LatentBatchNormConfig.from_params({"patch_size": 4}).patch_size == (4, 4)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"patch": 2}, ConfigError, r"unknown keys \['patch'\]"),
        ({"patch_size": [2, 0]}, ValueError, "patch_size must be two positive integers"),
        ({"patch_size": [2, 2, 2]}, ValueError, "patch_size must be two positive integers"),
        ({"eps": 0}, ValueError, "eps must be > 0"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \(0, 1\]"),
        ({"affine": "no"}, ValueError, "affine must be true or false"),
    ],
)
def test_bad_values_are_named(params: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NetworkConfig.from_params(tiny_ddconfig_dict(latent_batch_norm=params), 4)


def test_a_batch_norm_that_is_not_a_mapping_is_named() -> None:
    with pytest.raises(ValueError, match="latent_batch_norm must be a mapping"):
        NetworkConfig.from_params(tiny_ddconfig_dict(latent_batch_norm=True), 4)
