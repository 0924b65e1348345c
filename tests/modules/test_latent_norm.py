"""FLUX.2's latent BatchNorm (klvae.modules.latent_norm): FLUX.2's patch order, BatchNorm2d's numbers and names,
and statistics that nothing in training can move."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from klvae.modules.config import LatentBatchNormConfig, NetworkConfig
from klvae.modules.latent_norm import LatentBatchNorm, patchify, unpatchify
from klvae.modules.vae import KLAutoencoder
from tests.conftest import tiny_ddconfig_dict


def _with_statistics(norm: LatentBatchNorm, seed: int = 0) -> LatentBatchNorm:
    g = torch.Generator().manual_seed(seed)
    norm.running_mean.copy_(torch.randn(norm.num_features, generator=g))
    norm.running_var.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
    return norm


def test_patchify_is_flux2_channel_order_and_unpatchify_inverts_it() -> None:
    z = torch.randn(2, 3, 4, 6)  # non-square
    # black-forest-labs/flux2 AutoEncoder.encode: rearrange "... c (i pi) (j pj) -> ... (c pi pj) i j".
    flux2 = rearrange(z, "... c (i pi) (j pj) -> ... (c pi pj) i j", pi=2, pj=2)
    assert torch.equal(patchify(z, (2, 2)), flux2)
    assert torch.equal(unpatchify(flux2, (2, 2)), z)
    # a non-square patch keeps rows and columns apart
    assert torch.equal(unpatchify(patchify(z, (2, 3)), (2, 3)), z)
    assert patchify(z, (2, 3)).shape == (2, 18, 2, 2)
    with pytest.raises(ValueError, match="cannot be cut into 2x2 patches"):
        patchify(torch.randn(1, 3, 5, 6), (2, 2))


def test_patchify_matches_diffusers_flux2_pipeline() -> None:
    from tests.interop.helpers import flux2_pipeline_functions

    fns = flux2_pipeline_functions()
    z = torch.randn(2, 5, 6, 8)
    assert torch.equal(patchify(z, (2, 2)), fns["_patchify_latents"](z))
    assert torch.equal(
        unpatchify(patchify(z, (2, 2)), (2, 2)), fns["_unpatchify_latents"](fns["_patchify_latents"](z))
    )


@pytest.mark.parametrize("affine", [False, True])
def test_normalize_is_batchnorm2d_in_eval_and_denormalize_inverts_it(affine: bool) -> None:
    config = LatentBatchNormConfig(eps=1e-4, affine=affine)
    ours = _with_statistics(LatentBatchNorm(3, config))
    theirs = nn.BatchNorm2d(12, eps=1e-4, momentum=0.1, affine=affine).eval()
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
    # Same tensor names, shapes and dtypes as BatchNorm2d: each loads the other's state dict strictly.
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.state_dict().items()
    }
    z = torch.randn(2, 3, 4, 6)
    x = ours.normalize(z)  # (2, 12, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(x, theirs(patchify(z, (2, 2))), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.denormalize(x), z, rtol=1e-5, atol=1e-5)


def test_statistics_never_move_whatever_train_mode_is_asked() -> None:
    norm = _with_statistics(LatentBatchNorm(4, LatentBatchNormConfig()))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    parent = nn.Sequential(norm).train()  # what Lightning does to the whole model
    assert parent.training and not norm.training
    for _ in range(3):
        norm(torch.randn(8, 4, 4, 4) * 5 + 3)  # data far from the statistics
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())


def test_kl_f8_is_unchanged_without_the_batch_norm() -> None:
    # Default off: the 248 LDM keys, no bn, the same ddconfig, and a config equal to one that never heard of it.
    with torch.device("meta"):
        model = KLAutoencoder()
    assert model.bn is None and len(model.state_dict()) == 248
    assert not any(k.startswith("bn.") for k in model.state_dict())
    assert "bn" not in model.codec_modules()
    assert "latent_batch_norm" not in NetworkConfig().ddconfig()
    assert NetworkConfig.from_params({"latent_batch_norm": None}, 4) == NetworkConfig()


def test_flux2_shaped_network_has_the_batch_norm_under_bn() -> None:
    ddconfig = tiny_ddconfig_dict(levels=2, z_channels=8, latent_batch_norm={})
    model = KLAutoencoder.from_ddconfig(ddconfig, 8)
    keys = model.state_dict()
    assert {k for k in keys if k.startswith("bn.")} == {
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert keys["bn.running_mean"].shape == (32,)  # 4 · embed_dim
    assert model.codec_modules()["bn"] is model.bn
    assert not model.train().bn.training
    # encode/decode are the raw latent, as in training; bn maps to and from FLUX.2's transformer latents.
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mode()  # (1, 8, 8, 12)
        assert model.bn.normalize(z).shape == (1, 32, 4, 6)
        torch.testing.assert_close(model.bn.denormalize(model.bn.normalize(z)), z, rtol=1e-5, atol=1e-5)
