"""LPIPSWithDiscriminator: every term against its formula, written out independently here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.losses import LastLayer, LPIPSWithDiscriminator, hinge_d_loss, vanilla_d_loss
from klvae.modules.terms import LossTerm, TermInputs

B, C, H, W = 2, 3, 32, 32


def make_loss(**overrides) -> LPIPSWithDiscriminator:
    params = dict(disc_start=10, perceptual_weight=0.0, disc_num_layers=2, disc_ndf=8)
    params.update(overrides)
    return LPIPSWithDiscriminator(**params)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    x = torch.rand(B, C, H, W) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    posterior = DiagonalGaussianDistribution(torch.randn(B, 8, 4, 4))
    return x, x_hat, posterior


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pixel_and_kl_terms_match_formula(batch, pixel_loss, reduction):
    x, x_hat, posterior = batch
    loss_fn = make_loss(pixel_loss=pixel_loss, reduction=reduction, kl_weight=1e-3)
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, iteration=0)

    per_pixel = (x_hat - x).abs() if pixel_loss == "l1" else (x_hat - x) ** 2
    nll = per_pixel.sum() / B if reduction == "sum" else per_pixel.mean()
    kl = torch.stack([posterior.kl()[b] for b in range(B)]).mean()
    torch.testing.assert_close(loss, nll + 1e-3 * kl)
    torch.testing.assert_close(logs["train/nll_loss"], nll.detach())
    torch.testing.assert_close(logs["train/kl_loss"], kl.detach())
    torch.testing.assert_close(logs["train/rec_loss"], per_pixel.mean().detach())


def test_sum_reduction_is_chw_times_mean_reduction(batch):
    x, x_hat, posterior = batch
    s, _ = make_loss(reduction="sum", kl_weight=0.0).generator_loss(x, x_hat, posterior, 0)
    m, _ = make_loss(reduction="mean", kl_weight=0.0).generator_loss(x, x_hat, posterior, 0)
    torch.testing.assert_close(s, m * C * H * W)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_perceptual_term_is_lpips_broadcast_per_pixel(batch, reduction):
    x, x_hat, posterior = batch
    loss_fn = make_loss(
        perceptual_weight=0.5,
        perceptual_backbone="random",
        reduction=reduction,
        kl_weight=0.0,
        pixel_loss="l2",
    )
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0)
    p = loss_fn.perceptual_loss(x, x_hat).flatten()  # (B,) LPIPS distances
    per_pixel = (x_hat - x) ** 2
    if reduction == "sum":
        expected = per_pixel.sum() / B + 0.5 * C * H * W * p.mean()
    else:
        expected = per_pixel.mean() + 0.5 * p.mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["train/p_loss"], p.mean().detach())
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0  # gradients reach x̂ through LPIPS


def test_logvar_scales_nll_like_ldm(batch):
    x, x_hat, posterior = batch
    loss_fn = make_loss(logvar_init=0.5, kl_weight=0.0)
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0)
    per_pixel = (x_hat - x).abs()
    expected = (per_pixel / torch.exp(torch.tensor(0.5)) + 0.5).sum() / B
    torch.testing.assert_close(loss, expected)
    assert logs["train/logvar"] == pytest.approx(0.5)
    assert not loss_fn.logvar.requires_grad
    assert make_loss(learn_logvar=True).logvar.requires_grad


def test_gan_terms_exactly_zero_before_disc_start_and_discriminator_not_run(batch):
    x, x_hat, posterior = batch
    loss_fn = make_loss(disc_start=5)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *_: calls.append(1))
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 4, last_layer=torch.ones(1, requires_grad=True))
    assert calls == []
    assert logs["train/g_loss"].item() == 0.0
    assert logs["train/d_weight"].item() == 0.0
    assert logs["train/disc_factor"].item() == 0.0
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, 4)
    assert d_loss.item() == 0.0


def _reference_generator_loss(loss_fn, x, x_hat, posterior, last_weight, disc_factor):
    """LDM's formula written out: λ from two autograd.grad calls into the last conv weight."""
    per_pixel = (x_hat - x).abs() if loss_fn.pixel_loss == "l1" else (x_hat - x) ** 2
    rec = loss_fn.pixel_weight * per_pixel
    if loss_fn.perceptual_loss is not None:
        rec = rec + loss_fn.perceptual_weight * loss_fn.perceptual_loss(x, x_hat)
    nll = rec / torch.exp(loss_fn.logvar) + loss_fn.logvar
    nll = nll.sum() / B if loss_fn.reduction == "sum" else nll.mean()
    kl = posterior.kl().sum() / B
    g = -loss_fn.discriminator(x_hat).mean()
    grad_nll = torch.autograd.grad(nll, last_weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last_weight, retain_graph=True)[0]
    lam = (
        torch.clamp(grad_nll.norm() / (grad_g.norm() + 1e-4), 0, 1e4).detach() * loss_fn.discriminator_weight
    )
    return nll + loss_fn.kl_weight * kl + lam * disc_factor * g, lam, g


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_adaptive_weight_and_gradients_equal_the_two_autograd_grad_formula(pixel_loss, reduction, disc_loss):
    torch.manual_seed(0)
    loss_fn = make_loss(disc_start=3, disc_weight=0.7, kl_weight=1e-2, pixel_loss=pixel_loss, reduction=reduction,
                        disc_loss=disc_loss, perceptual_weight=0.5, perceptual_backbone="random", learn_logvar=True,
                        disc_factor=0.8)  # fmt: skip
    # A stand-in decoder: learnable features h → last conv (the layer λ differentiates against).
    h = torch.randn(B, 4, H, W, requires_grad=True)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    mean = torch.randn(B, 4, 4, 4, requires_grad=True)
    x = torch.rand(B, C, H, W) * 2 - 1
    params = [h, conv.weight, conv.bias, mean, loss_fn.logvar]

    def decode():
        return conv(h)

    def posterior():
        return DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1))

    ref, lam, g = _reference_generator_loss(loss_fn, x, decode(), posterior(), conv.weight, 0.8)
    ref_grads = torch.autograd.grad(ref, params)

    saved = {}
    conv.register_forward_hook(lambda m, args, out: saved.update(h=args[0]))
    loss, logs = loss_fn.generator_loss(x, decode(), posterior(), 3, LastLayer(conv, saved["h"]))
    grads = torch.autograd.grad(loss, params)

    torch.testing.assert_close(logs["train/d_weight"], lam, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["train/g_loss"], g.detach())
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert lam.item() > 0 and logs["train/disc_factor"].item() == pytest.approx(0.8)
    for name, a, b in zip(["h", "weight", "bias", "mean", "logvar"], grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)


class ConvBackwardCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten.convolution_backward.default
        return func(*args, **(kwargs or {}))


def test_generator_loss_runs_lpips_and_discriminator_backward_once():
    """The adaptive weight costs no extra backward through LPIPS, D or the decoder (LDM's way: two more)."""
    torch.manual_seed(0)
    loss_fn = make_loss(disc_start=0, perceptual_weight=0.5, perceptual_backbone="random")
    loss_fn.discriminator.requires_grad_(False)  # as in the autoencoder update (toggle_optimizer)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(B, 4, H, W, requires_grad=True)
    x = torch.rand(B, C, H, W) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.randn(B, 8, 4, 4))
    n_lpips = sum(isinstance(m, torch.nn.Conv2d) for m in loss_fn.perceptual_loss.modules())
    n_disc = sum(isinstance(m, torch.nn.Conv2d) for m in loss_fn.discriminator.modules())
    n_convs = n_lpips + n_disc + 1
    saved = {}
    conv.register_forward_hook(lambda m, args, out: saved.update(h=args[0]))
    with ConvBackwardCounter() as new:
        loss, _ = loss_fn.generator_loss(x, conv(h), posterior, 0, LastLayer(conv, saved["h"]))
        loss.backward()
    with ConvBackwardCounter() as old:
        ref, _, _ = _reference_generator_loss(loss_fn, x, conv(h), posterior, conv.weight, 1.0)
        ref.backward()
    # Each conv's backward once, plus the two weight-only conv2d_weight calls of the last layer ...
    assert new.calls == n_convs + 2
    # ... where LDM's formula runs LPIPS' (for nll) and D's (for g) backward twice, the last conv thrice.
    assert old.calls == n_convs + n_lpips + n_disc + 2, (old.calls, n_convs, n_lpips, n_disc)


def test_validation_uses_zero_adaptive_weight(batch):
    x, x_hat, posterior = batch
    loss_fn = make_loss(disc_start=0).eval()
    with torch.no_grad():
        _, logs = loss_fn.generator_loss(x, x_hat, posterior, 10, last_layer=None, split="val")
    assert logs["val/d_weight"].item() == 0.0
    assert logs["val/g_loss"].item() != 0.0


def test_hinge_and_vanilla_match_formulas():
    real, fake = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    hinge = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    vanilla = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(hinge_d_loss(real, fake), hinge)
    torch.testing.assert_close(vanilla_d_loss(real, fake), vanilla)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_uses_real_and_detached_fake(batch, kind):
    x, x_hat, _ = batch
    loss_fn = make_loss(disc_start=0, disc_loss=kind, disc_factor=0.8)
    d_loss, logs = loss_fn.discriminator_loss(x, x_hat, 0)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(x_hat.detach())
    expected = 0.8 * (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(real, fake)
    torch.testing.assert_close(d_loss, expected)
    torch.testing.assert_close(logs["train/logits_real"], real.mean().detach())
    d_loss.backward()
    assert x_hat.grad is None  # no gradient leaks into the autoencoder
    assert loss_fn.discriminator.main[0].weight.grad is not None


def test_lpips_is_frozen_and_stays_in_eval_mode():
    loss_fn = make_loss(perceptual_weight=1.0, perceptual_backbone="random")
    loss_fn.train()
    assert loss_fn.discriminator.training
    assert not loss_fn.perceptual_loss.training
    assert all(not m.training for m in loss_fn.perceptual_loss.modules())
    assert all(not p.requires_grad for p in loss_fn.perceptual_loss.parameters())
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.equal(loss_fn.perceptual_loss(x, y), loss_fn.perceptual_loss(x, y))  # no dropout


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pixel_loss", "l3"),
        ("reduction", "avg"),
        ("disc_loss", "wgan"),
        ("disc_start", -1),
        ("kl_weight", -1.0),
    ],
)
def test_invalid_loss_option_raises_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        make_loss(**{key: value})


def test_loss_scale_for_the_x_hat_gradients_changes_nothing_in_fp32():
    torch.manual_seed(0)
    loss_fn = make_loss(disc_start=0, perceptual_weight=0.5, perceptual_backbone="random", learn_logvar=True)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(B, 4, H, W, requires_grad=True)
    x = torch.rand(B, C, H, W) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.randn(B, 8, 4, 4))
    results = []
    for scale in (None, torch.full((1,), 2.0**12)):  # GradScaler keeps its scale as a (1,) tensor
        x_hat = conv(h)
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, LastLayer(conv, h), grad_scale=scale)
        assert loss.shape == ()
        results.append((logs["train/d_weight"], *torch.autograd.grad(loss, [h, conv.weight, loss_fn.logvar])))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- named terms, adaptive latent terms
class _StandIn(torch.nn.Module):
    """A stand-in network: features a → encoder conv_out → moments → z ~ q → 8× upsample → decoder conv_out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(B, 8, 4, 4))
        self.enc_out = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.dec_in = torch.nn.Conv2d(4, 6, 1)
        self.dec_out = torch.nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, cut: bool):
        from klvae.modules.losses import LatentCut

        h = self.enc_out(self.a)  # (B, 8, 4, 4): the encoder's last conv output
        posterior = DiagonalGaussianDistribution(h)
        z = posterior.sample()  # (B, 4, 4, 4)
        leaf = z.detach().requires_grad_(True) if cut else z
        features = torch.nn.functional.interpolate(self.dec_in(leaf), scale_factor=8)
        x_hat = self.dec_out(features)
        latent_cut = LatentCut(z, leaf, LastLayer(self.enc_out, self.a, h)) if cut else None
        return x_hat, posterior, z, LastLayer(self.dec_out, features), latent_cut


def _vf_term_config(adaptive: bool) -> dict:
    from tests.conftest import tiny_backbone_config

    params = {"latent_channels": 4, "backbone": tiny_backbone_config(), "weight": 0.1, "adaptive": adaptive,
              "cos_margin": 0.5, "distmat_margin": 0.25}  # fmt: skip
    return {"target": "klvae.modules.vf_loss.VFLoss", "params": params}


@pytest.mark.parametrize("iteration", [0, 5])  # before disc_start (pure VA-VAE) and with the GAN on
def test_adaptive_vf_weight_and_gradients_equal_the_autograd_grad_formula(iteration):
    """VA-VAE's adaptive VF weight, ‖∇_W rec‖ / (‖∇_W vf‖ + 1e-4) · vf_weight at the encoder's last conv,
    written out with autograd.grad as LightningDiT does; klvae's two-pass backward must give the same
    weight and gradients. rec is what the decoder sends back: the NLL, plus λ·g once the GAN is on."""
    torch.manual_seed(0)
    loss_fn = make_loss(disc_start=3, kl_weight=1e-2, perceptual_weight=0.5, perceptual_backbone="random",
                        terms={"vf": _vf_term_config(adaptive=True)})  # fmt: skip
    loss_fn.discriminator.requires_grad_(False)  # as in the autoencoder update
    net = _StandIn()
    x = torch.rand(B, C, H, W) * 2 - 1
    params = [net.a, net.enc_out.weight, net.dec_in.weight, net.dec_out.weight, net.dec_out.bias,
              *loss_fn.terms["vf"].linear_proj.parameters()]  # fmt: skip
    vf_term = loss_fn.terms["vf"]

    torch.manual_seed(1)
    x_hat, posterior, z, last, _ = net(cut=False)
    nll = ((x_hat - x).abs() + 0.5 * loss_fn.perceptual_loss(x, x_hat)).sum() / B
    kl = posterior.kl().sum() / B
    vf = vf_term.losses(z, x)["vf"]
    rec = nll
    if iteration >= 3:
        g = -loss_fn.discriminator(x_hat).mean()
        g_nll = torch.autograd.grad(nll, net.dec_out.weight, retain_graph=True)[0]
        g_g = torch.autograd.grad(g, net.dec_out.weight, retain_graph=True)[0]
        lam = torch.clamp(g_nll.norm() / (g_g.norm() + 1e-4), 0, 1e4).detach()
        rec = nll + lam * g
    g_rec = torch.autograd.grad(rec, net.enc_out.weight, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, net.enc_out.weight, retain_graph=True)[0]
    w = 0.1 * torch.clamp(g_rec.norm() / (g_vf.norm() + 1e-4), 0, 1e8).detach()
    ref_grads = torch.autograd.grad(rec + 1e-2 * kl + w * vf, params)

    torch.manual_seed(1)
    x_hat, posterior, z, last, cut = net(cut=True)
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, iteration, last, latents=z, encoder_images=x,
                                        latent_cut=cut)  # fmt: skip
    loss.backward()
    torch.testing.assert_close(logs["train/vf_weight"], w, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["train/vf_loss"], vf.detach())
    assert set(logs) >= {"train/vf_cos", "train/vf_distmat", "train/kl_weight", "train/rec_weight"}
    for p, ref in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


class LatentMeanTerm(LossTerm):
    """A term a contributor might add: (mean of the posterior means)², weight from the YAML."""

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return inputs.posterior.mean.mean().square()


def test_a_new_term_is_one_entry_and_keeps_its_gradient_once_the_gan_starts(batch):
    """A contributor's term (here: the latents' mean pulled to 0) added in lossconfig.params.terms is in
    the objective, logged with its weight, and differentiated both before and after disc_start (the
    assembled-twice objective lost it in the adaptive-weight path)."""
    x, _, _ = batch
    loss_fn = make_loss(disc_start=1, terms={"center": {"target": "tests.modules.test_losses.LatentMeanTerm",
                                                       "params": {"weight": 3.0}}})  # fmt: skip
    for iteration in (0, 1):
        net = _StandIn()
        x_hat, posterior, z, last, _ = net(cut=False)
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, iteration, last, latents=z)
        assert logs["train/center_weight"].item() == 3.0
        torch.testing.assert_close(logs["train/center_loss"], posterior.mean.mean().square().detach())
        loss.backward()
        without = make_loss(disc_start=1)
        without.discriminator.load_state_dict(loss_fn.discriminator.state_dict())
        net.zero_grad()
        torch.manual_seed(3)
        x_hat, posterior, z, last, _ = net(cut=False)
        loss, _ = loss_fn.generator_loss(x, x_hat, posterior, iteration, last, latents=z)
        (with_term,) = torch.autograd.grad(loss, [net.a])
        torch.manual_seed(3)
        x_hat, posterior, z, last, _ = net(cut=False)
        base, _ = without.generator_loss(x, x_hat, posterior, iteration, last, latents=z)
        (without_term,) = torch.autograd.grad(base, [net.a])
        torch.manual_seed(3)
        _, posterior, _, _, _ = net(cut=False)
        (term_only,) = torch.autograd.grad(3.0 * posterior.mean.mean().square(), [net.a])
        torch.testing.assert_close(with_term, without_term + term_only, rtol=1e-4, atol=1e-6)


def test_decoder_only_training_with_an_encoder_term_is_a_config_error(tiny_ddconfig):
    from klvae.errors import ConfigError
    from klvae.models.autoencoder import AutoencoderKL

    lossconfig = {"target": "klvae.modules.losses.LPIPSWithDiscriminator",
                  "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8,
                             "terms": {"vf": _vf_term_config(adaptive=True)}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"train_decoder_only.*lossconfig"):
        AutoencoderKL(tiny_ddconfig, lossconfig, embed_dim=4, train_decoder_only=True)


def test_two_pass_backward_follows_the_loss_scale_and_keeps_the_adaptive_weight():
    """manual_backward multiplies the loss by GradScaler's scale / accumulation: the two passes must pass that
    factor on to every gradient and leave the adaptive VF weight alone."""
    torch.manual_seed(0)
    loss_fn = make_loss(disc_start=0, terms={"vf": _vf_term_config(adaptive=True)})
    loss_fn.discriminator.requires_grad_(False)
    x = torch.rand(B, C, H, W) * 2 - 1
    results = []
    for factor in (1.0, 1024.0):
        torch.manual_seed(1)
        net = _StandIn()
        x_hat, posterior, z, last, cut = net(cut=True)
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 1, last, latents=z, encoder_images=x,
                                            latent_cut=cut)  # fmt: skip
        (loss * factor).backward()
        results.append((logs["train/vf_weight"].clone(), [p.grad / factor for p in net.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
