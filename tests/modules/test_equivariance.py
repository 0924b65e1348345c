"""EQ-VAE transforms: same τ on image and latent, the reference's ops, seeded branch frequencies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from klvae.modules.equivariance import (
    EQUIVARIANCE_SCALES,
    Branch,
    EquivarianceSchedule,
    Transform,
)


def test_scale_set_is_eight_to_thirty_one_over_thirty_two():
    assert tuple(s / 32 for s in range(8, 32)) == EQUIVARIANCE_SCALES


@pytest.mark.parametrize("channels", [4, 16])
@pytest.mark.parametrize("scale", [(8 / 32, 8 / 32), (17 / 32, 17 / 32), (31 / 32, 12 / 32)])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_transform_equals_reference_ops_at_256(channels, scale, turns):
    # zelaki/eqvae: F.interpolate(scale_factor=s, bilinear, align_corners=False), then rot90(k, dims=[-1, -2]),
    # on the posterior sample and on the image alike.
    def reference(t: torch.Tensor) -> torch.Tensor:
        t = F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
        return torch.rot90(t, k=turns, dims=[-1, -2])

    tau = Transform(scale, turns)
    z, x = torch.randn(2, channels, 32, 32), torch.rand(2, 3, 256, 256) * 2 - 1
    assert torch.equal(tau.latent(z), reference(z))
    assert torch.equal(tau.image(x, 8), reference(x))


def test_image_follows_the_latent_grid_for_any_side():
    # 20 · 9/32 = 5.6: the latent gets 5 rows, so the image must get 5 · 8 = 40 (not floor(160 · 9/32) = 45).
    tau = Transform((9 / 32, 9 / 32), 1)
    z, x = torch.randn(1, 4, 20, 12), torch.randn(1, 3, 160, 96)
    assert tau.latent(z).shape[-2:] == (3, 5)  # (5, 3) rotated
    assert tau.image(x, 8).shape[-2:] == (24, 40)


class PointwiseCodec:
    """An exactly equivariant stand-in: E and D are per-pixel linear maps (f = 1), so any per-channel linear
    spatial operation (bilinear resize, rotation) commutes with them."""

    def __init__(self, channels: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(channels, 3, generator=g, dtype=torch.float64)
        self.v = torch.linalg.pinv(self.w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ck,bkhw->bchw", self.w, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bchw->bkhw", self.v, z)


@pytest.mark.parametrize("channels", [4, 16])
def test_transform_commutes_with_an_equivariant_codec(channels):
    codec = PointwiseCodec(channels)
    x = torch.rand(2, 3, 24, 40, dtype=torch.float64)
    schedule = EquivarianceSchedule(p=1.0, anisotropic=True)
    for i in range(20):
        tau = schedule.draw(i).transform
        lhs = codec.decode(tau.latent(codec.encode(x)))  # D(τ(E(x)))
        assert torch.allclose(lhs, tau.image(x, 1), atol=1e-10), tau


def test_rotation_commutes_with_pooling_codec_at_f8():
    # E = 8×8 average pooling, D = nearest 8× upsampling: exact for rotations (and images constant on 8×8 blocks).
    grid = torch.randn(1, 3, 5, 7)
    x = F.interpolate(grid, scale_factor=8, mode="nearest")
    for k in (1, 2, 3):
        tau = Transform(quarter_turns=k)
        decoded = F.interpolate(tau.latent(F.avg_pool2d(x, 8)), scale_factor=8, mode="nearest")
        assert torch.allclose(decoded, tau.image(x, 8), atol=1e-6)  # the block mean rounds


def test_branch_draws_are_seeded_and_follow_the_probabilities():
    a = [EquivarianceSchedule(0.5, 0.25, seed=3).draw(i) for i in range(2000)]
    b = [EquivarianceSchedule(0.5, 0.25, seed=3).draw(i) for i in range(2000)]
    c = [EquivarianceSchedule(0.5, 0.25, seed=4).draw(i) for i in range(50)]
    assert a == b and a[:50] != c
    names = [br.name for br in a]
    assert names.count("equivariance") / 2000 == pytest.approx(0.5, abs=0.04)
    assert names.count("prior_small") / 2000 == pytest.approx(0.5 * 0.25, abs=0.03)
    eq = [br.transform for br in a if br.name == "equivariance"]
    assert {t.quarter_turns for t in eq} == {1, 2, 3}  # always rotated, never the identity turn
    assert {t.scale[0] for t in eq} == set(EQUIVARIANCE_SCALES)  # always downscaled, every scale drawn
    assert all(t.scale[0] == t.scale[1] for t in eq)  # isotropic by default
    small = [br.input_scale for br in a if br.name == "prior_small"]
    assert set(small) <= set(EQUIVARIANCE_SCALES) and len(set(small)) > 10
    assert all(br == Branch() for br in a if br.name == "normal")


@pytest.mark.parametrize(
    ("p", "p_small", "expected"),
    [(1.0, 1.0, "equivariance"), (0.0, 1.0, "prior_small"), (0.0, 0.0, "normal")],
)
def test_extreme_probabilities_pick_one_branch(p, p_small, expected):
    schedule = EquivarianceSchedule(p, p_small)
    assert {schedule.draw(i).name for i in range(100)} == {expected}


def test_anisotropic_draws_independent_scales():
    eq = [EquivarianceSchedule(1.0, anisotropic=True).draw(i).transform for i in range(100)]
    assert any(t.scale[0] != t.scale[1] for t in eq)


def test_branch_inputs_latents_and_targets():
    x, z = torch.randn(2, 3, 64, 64), torch.randn(2, 16, 8, 8)
    normal = Branch()
    assert normal.encoder_input(x, 8) is x and normal.latent(z) is z and normal.target(x, 8) is x
    small = Branch("prior_small", input_scale=20 / 32)  # 8 · 20/32 = 5 latent rows → 40 pixels
    assert small.encoder_input(x, 8).shape == (2, 3, 40, 40) and small.latent(z) is z
    eq = Branch("equivariance", Transform((0.5, 0.75), 1))
    assert eq.encoder_input(x, 8) is x
    assert eq.latent(z).shape == (2, 16, 6, 4) and eq.target(x, 8).shape == (2, 3, 48, 32)


@pytest.mark.parametrize(
    ("config", "match"),
    [({"p": 1.5}, "probability"), ({"p": 0.5, "q": 1}, "unknown keys"), ({"p_small": 0.2}, "needs p")],
)
def test_bad_config_is_a_clear_error(config, match):
    with pytest.raises(ValueError, match=match):
        EquivarianceSchedule.from_config(config)


def test_too_small_image_is_a_clear_error():
    with pytest.raises(ValueError, match="larger images"):
        Transform((8 / 32, 8 / 32)).image(torch.randn(1, 3, 24, 24), 8)
