"""The adversarial pieces (klvae.modules.gan) and the discriminator objective's named terms: every formula
written out here, R1 through a compiled discriminator, LeCam's anchors in the state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from klvae.modules.gan import LeCam, non_saturating_d_loss, r1_penalty
from klvae.modules.losses import LPIPSWithDiscriminator

B = 2


def make_loss(**overrides) -> LPIPSWithDiscriminator:
    params = dict(disc_start=0, perceptual_weight=0.0, disc_num_layers=2, disc_ndf=8)
    params.update(overrides)
    return LPIPSWithDiscriminator(**params)


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, torch.rand(B, 3, 32, 32, generator=g) * 2 - 1


def test_non_saturating_losses_match_stylegan2():
    real, fake = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    expected = torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean()
    torch.testing.assert_close(non_saturating_d_loss(real, fake), expected)
    loss_fn = make_loss(disc_loss="non_saturating")
    torch.testing.assert_close(loss_fn.generator_adversarial(fake), torch.log1p(torch.exp(-fake)).mean())
    assert make_loss(disc_loss="hinge").generator_adversarial(fake) == -fake.mean()


def test_lecam_matches_the_formula_and_its_anchors_follow_the_mean_logits():
    lecam = LeCam(decay=0.9)
    real, fake = torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 0.3]])
    lecam.update(real, fake)  # the first update sets the anchors to the logits' means
    assert lecam.ema_real.item() == pytest.approx(1.25) and lecam.ema_fake.item() == pytest.approx(-0.35)
    lecam.update(torch.tensor([[3.25]]), torch.tensor([[0.65]]))
    assert lecam.ema_real.item() == pytest.approx(0.9 * 1.25 + 0.1 * 3.25)
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -0.35 + 0.1 * 0.65)
    a_real, a_fake = lecam.ema_real.item(), lecam.ema_fake.item()
    # google/lecam-gan: mean(relu(D(x) − α_fake)²) + mean(relu(α_real − D(x̂))²)
    expected = (
        sum(max(r - a_fake, 0) ** 2 for r in (0.5, 2.0)) / 2
        + sum(max(a_real - f, 0) ** 2 for f in (-1.0, 0.3)) / 2
    )
    assert lecam(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake", "initialized"}  # resumes exactly


def test_r1_penalty_is_the_squared_input_gradient_norm():
    x = torch.randn(B, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 8, 8)
    logits = (x * w).sum(dim=(1, 2, 3), keepdim=True) ** 2  # ∇_x = 2·(x·w)·w per sample
    per_sample = (2 * (x * w).sum(dim=(1, 2, 3)).view(B, 1, 1, 1) * w).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(r1_penalty(logits, x), per_sample.mean())


@pytest.mark.parametrize("compiled", [False, True])
def test_discriminator_objective_terms_lecam_and_lazy_r1(compiled):
    torch.manual_seed(0)
    loss_fn = make_loss(lecam_weight=0.3, r1_gamma=2.0, r1_interval=4, disc_factor=0.5)
    if compiled:  # R1 must still work: its forward runs eagerly, the other steps compiled
        loss_fn.discriminator.compile(backend="aot_eager")
    x, x_hat = images()
    for update_index in range(5):
        d = loss_fn.discriminator
        d_loss, logs = loss_fn.discriminator_loss(x, x_hat, iteration=0, update_index=update_index)
        d_loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
        d.zero_grad()
        r1_step = update_index % 4 == 0
        assert ("train/r1_loss" in logs) == r1_step and "train/lecam_loss" in logs
        # Every term of the discriminator objective is logged with its weight, and they sum to disc_loss.
        hinge = 0.5 * (F.relu(1 - d(x)).mean() + F.relu(1 + d(x_hat)).mean())
        total = 0.5 * hinge + 0.5 * 0.3 * logs["train/lecam_loss"]
        if r1_step:
            assert logs["train/r1_weight"].item() == 0.5 * 2.0 * 4  # γ/2 · interval
            total = total + 0.5 * logs["train/r1_weight"] * logs["train/r1_loss"]
        assert logs["train/lecam_weight"].item() == pytest.approx(0.3)
        torch.testing.assert_close(logs["train/disc_loss"], total.detach(), rtol=1e-4, atol=1e-6)


def test_regularisers_are_off_by_default_and_in_evaluation():
    x, x_hat = images()
    _, logs = make_loss().discriminator_loss(x, x_hat, 0)
    assert set(logs) == {"train/disc_loss", "train/disc_factor", "train/logits_real", "train/logits_fake"}
    loss_fn = make_loss(lecam_weight=0.1, r1_gamma=1.0).eval()
    with torch.no_grad():
        _, logs = loss_fn.discriminator_loss(x, x_hat, 0, "val")
    assert "val/r1_loss" not in logs and not bool(loss_fn.lecam.initialized)  # no anchor update in eval


def test_discriminator_config_builds_any_discriminator_and_the_patchgan_default_is_unchanged():
    from tests.conftest import tiny_backbone_config

    torch.manual_seed(0)
    default = make_loss()
    torch.manual_seed(0)
    explicit = make_loss(discriminator_config={
        "target": "klvae.modules.discriminator.NLayerDiscriminator",
        "params": {"input_nc": 3, "ndf": 8, "n_layers": 2},
    }, disc_num_layers=3, disc_ndf=64)  # fmt: skip
    for a, b in zip(default.discriminator.state_dict().values(), explicit.discriminator.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    dino = make_loss(discriminator_config={
        "target": "klvae.modules.dino_discriminator.DinoDiscriminator",
        "params": {"backbone": tiny_backbone_config("vit_small_patch16_224.dino"), "blocks": [1, 3, -1]},
    }, disc_num_layers=3, disc_ndf=64)  # fmt: skip
    x, x_hat = images()
    d_loss, logs = dino.discriminator_loss(x, x_hat, 0)
    assert torch.isfinite(d_loss) and set(dino.compile_regions()) == {"discriminator"}
    with pytest.raises(ValueError, match=r"\['disc_ndf'\].*discriminator_config"):
        make_loss(
            discriminator_config={"target": "klvae.modules.discriminator.NLayerDiscriminator"},
            disc_ndf=16,
            disc_num_layers=3,
        )
