"""VA-VAE's VF loss: margin losses against a loop computation, the projection, gradients, shapes, compile."""

from __future__ import annotations

import math

import pytest
import torch

from klvae.errors import ConfigError
from klvae.modules.backbones import FrozenViT
from klvae.modules.vf_loss import VFLoss, adaptive_vf_weight, vf_cos_loss, vf_distmat_loss
from tests.conftest import tiny_backbone_config, tiny_backbone_dict


def loop_cos_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> float:
    """relu(1 − m − cos) averaged over batch and positions, one position at a time in float64."""
    total, count = 0.0, 0
    for b in range(z.shape[0]):
        for y in range(z.shape[2]):
            for x in range(z.shape[3]):
                u, v = z[b, :, y, x].double(), f[b, :, y, x].double()
                cos = float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))
                total += max(0.0, 1.0 - margin - cos)
                count += 1
    return total / count


def loop_distmat_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> float:
    """relu(|cos(z_i, z_j) − cos(f_i, f_j)| − m) averaged over batch and position pairs, pair by pair."""

    def cos(t: torch.Tensor, i: int, j: int) -> float:
        u, v = t[:, i].double(), t[:, j].double()
        return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))

    total, count = 0.0, 0
    for b in range(z.shape[0]):
        zb, fb = z[b].flatten(1), f[b].flatten(1)  # (C, N), positions in row-major order
        n = zb.shape[1]
        for i in range(n):
            for j in range(n):
                total += max(0.0, abs(cos(zb, i, j) - cos(fb, i, j)) - margin)
                count += 1
    return total / count


@pytest.mark.parametrize(("cos_margin", "distmat_margin"), [(0.0, 0.0), (0.5, 0.25), (0.2, 0.05)])
def test_margin_losses_match_a_loop_computation(cos_margin, distmat_margin):
    torch.manual_seed(5)
    z = torch.randn(2, 6, 3, 4)
    f = z + 0.8 * torch.randn(2, 6, 3, 4)  # correlated, so some terms fall inside the margins
    assert vf_cos_loss(z, f, cos_margin).item() == pytest.approx(loop_cos_loss(z, f, cos_margin), rel=1e-5)
    assert vf_distmat_loss(z, f, distmat_margin).item() == pytest.approx(
        loop_distmat_loss(z, f, distmat_margin), rel=1e-5
    )
    # The distance matrix compares self-similarities only: the widths may differ.
    wide = torch.randn(2, 9, 3, 4)
    assert vf_distmat_loss(z, wide, distmat_margin).item() == pytest.approx(
        loop_distmat_loss(z, wide, distmat_margin), rel=1e-5
    )


def test_margins_make_close_enough_latents_free():
    torch.manual_seed(0)
    f = torch.randn(1, 4, 3, 3)
    assert vf_cos_loss(f, f, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert vf_distmat_loss(f, f, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert vf_cos_loss(-f, f, 0.5).item() == pytest.approx(1.5, abs=1e-6)  # cos = −1: 1 − 0.5 + 1


def vf(latent_channels: int = 4, **params) -> VFLoss:
    backbone = tiny_backbone_config(**params.pop("backbone", {}))
    return VFLoss(latent_channels=latent_channels, backbone=backbone, **params)


def test_projection_direction_and_the_combined_term():
    torch.manual_seed(1)
    forward = vf(cos_margin=0.5, distmat_margin=0.25, cos_weight=2.0, distmat_weight=0.5)
    assert forward.linear_proj.weight.shape == (32, 4, 1, 1) and forward.linear_proj.bias is None
    reverse = vf(reverse_proj=False)
    assert reverse.linear_proj.weight.shape == (4, 32, 1, 1) and reverse.linear_proj.bias is not None

    latents, x = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32) * 2 - 1
    out = forward.losses(latents, x)
    features = forward.target_features(x, (4, 4))
    projected = forward.linear_proj(latents)
    cos = vf_cos_loss(projected, features, 0.5)
    distmat = vf_distmat_loss(projected, features, 0.25)
    torch.testing.assert_close(out["vf_cos"], cos)
    torch.testing.assert_close(out["vf_distmat"], distmat)
    torch.testing.assert_close(out["vf"], 2.0 * cos + 0.5 * distmat)
    # The other direction projects the features and compares them with the raw latents.
    out = reverse.losses(latents, x)
    torch.testing.assert_close(
        out["vf_cos"], vf_cos_loss(latents, reverse.linear_proj(reverse.target_features(x, (4, 4))), 0.0)
    )


def test_gradient_reaches_only_the_projection_and_the_latents():
    for reverse_proj in (True, False):
        loss = vf(reverse_proj=reverse_proj)
        latents = torch.randn(2, 4, 4, 4, requires_grad=True)
        x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
        loss.losses(latents, x)["vf"].backward()
        assert latents.grad is not None and latents.grad.abs().sum() > 0
        assert loss.linear_proj.weight.grad is not None and loss.linear_proj.weight.grad.abs().sum() > 0
        assert x.grad is None  # the target features are constants
        assert all(p.grad is None and not p.requires_grad for p in loss.backbone._vit.parameters())
        assert [n for n, _ in loss.named_parameters()] == [n for n in loss.state_dict()]
        assert all(k.startswith("linear_proj.") for k in loss.state_dict())


@pytest.mark.parametrize(("channels", "factor"), [(4, 8), (32, 16)])
def test_shapes_at_256_for_f8_and_f16(channels, factor):
    # A ViT-/14 at 224² gives 16×16 features: f16's grid as is, f8's 32×32 after bilinear upsampling.
    backbone = FrozenViT(**tiny_backbone_dict(image_size=224, model_kwargs={"depth": 1}))
    loss = VFLoss(latent_channels=channels, backbone=backbone, cos_margin=0.5, distmat_margin=0.25)
    side = 256 // factor
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert backbone(x).shape == (2, 32, 16, 16)
    assert loss.target_features(x, (side, side)).shape == (2, 32, side, side)
    out = loss.losses(torch.randn(2, channels, side, side), x)
    assert set(out) == {"vf", "vf_cos", "vf_distmat"}
    assert all(v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="cos_margin"):
        vf(cos_margin=-0.1)
    loss = vf()
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        loss.losses(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="1 images for 2 latents"):
        loss.losses(torch.randn(2, 4, 4, 4), torch.zeros(1, 3, 32, 32))


def test_adaptive_vf_weight_is_the_reference_formula():
    torch.manual_seed(2)
    nll_grad, vf_grad = torch.randn(32, 64, 3, 3), torch.randn(32, 64, 3, 3) * 1e-3
    expected = math.sqrt(float((nll_grad.double() ** 2).sum())) / (
        math.sqrt(float((vf_grad.double() ** 2).sum())) + 1e-4
    )
    weight = adaptive_vf_weight(nll_grad, vf_grad, vf_weight=0.1)
    assert weight.ndim == 0 and not weight.requires_grad
    assert weight.item() == pytest.approx(0.1 * expected, rel=1e-5)
    # Clamped at 1e8 (the GAN's λ clamps at 1e4): a vanishing VF gradient gives 1e8 · vf_weight.
    assert adaptive_vf_weight(torch.full((10,), 1e6), torch.zeros(10), 0.5).item() == pytest.approx(0.5e8)
    assert adaptive_vf_weight(torch.zeros(10), torch.ones(10), 0.5).item() == 0.0
    g = torch.ones(4, requires_grad=True) * 2
    assert not adaptive_vf_weight(g, g, 1.0).requires_grad


def test_compiles_as_one_region_with_aot_eager():
    loss = vf(cos_margin=0.5, distmat_margin=0.25, backbone={"model_kwargs": {"depth": 2}})
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    expected = loss.losses(latents, x)
    (expected_grad,) = torch.autograd.grad(expected["vf"], latents)
    compiled = torch.compile(loss.losses, backend="aot_eager", fullgraph=True)
    out = compiled(latents, x)
    (grad,) = torch.autograd.grad(out["vf"], latents)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key])
    torch.testing.assert_close(grad, expected_grad)


def test_bf16_autocast_keeps_the_losses_fp32():
    loss = vf(cos_margin=0.1, distmat_margin=0.05)
    latents, x = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 48, 48) * 2 - 1
    reference = loss.losses(latents, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss.losses(latents, x)
    for key in reference:
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(reference[key].item(), abs=0.02)


def test_builds_from_a_yaml_block_and_a_typo_in_the_backbone_block_is_named():
    from omegaconf import OmegaConf

    from klvae.util import instantiate_from_config

    backbone = tiny_backbone_config()
    config = OmegaConf.create(
        {
            "target": "klvae.modules.vf_loss.VFLoss",
            "params": {
                "latent_channels": 32,
                "backbone": backbone,
                "cos_margin": 0.5,
                "distmat_margin": 0.25,
            },
        }
    )
    loss = instantiate_from_config(config)
    assert isinstance(loss, VFLoss) and loss.backbone.width == 32 and loss.cos_margin == 0.5
    backbone["params"]["allow_random"] = True  # a typo of allow_random_backbone
    with pytest.raises(ConfigError, match=r"FrozenViT: unknown parameter\(s\) \['allow_random'\]"):
        instantiate_from_config(
            {
                "target": "klvae.modules.vf_loss.VFLoss",
                "params": {"latent_channels": 32, "backbone": backbone},
            }
        )
