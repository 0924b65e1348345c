from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from klvae.modules.distributions import DiagonalGaussianDistribution


def moments(b=3, c=4, h=5, w=6, scale=1.0):
    return torch.randn(b, 2 * c, h, w, dtype=torch.float64) * scale


def test_kl_matches_torch_distributions_closed_form():
    params = moments()
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params.chunk(2, dim=1)
    q = Normal(mean, torch.exp(0.5 * logvar))
    expected = kl_divergence(q, Normal(torch.zeros_like(mean), torch.ones_like(mean))).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)


def test_kl_between_two_posteriors_matches_torch():
    a, b = DiagonalGaussianDistribution(moments()), DiagonalGaussianDistribution(moments())
    expected = kl_divergence(Normal(a.mean, a.std), Normal(b.mean, b.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(a.kl(b), expected)


def test_nll_matches_torch_log_prob():
    posterior = DiagonalGaussianDistribution(moments())
    x = torch.randn_like(posterior.mean)
    expected = -Normal(posterior.mean, posterior.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.nll(x), expected)


def test_logvar_is_clamped_to_published_range():
    params = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    params[0, 1, 0, 0], params[0, 1, 0, 1] = -100.0, 100.0
    posterior = DiagonalGaussianDistribution(params)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(posterior.var, torch.exp(posterior.logvar))


def test_sample_uses_reparameterisation():
    params = moments(b=1, c=2, h=64, w=64)
    posterior = DiagonalGaussianDistribution(params)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(posterior.sample(generator=g), posterior.mean + posterior.std * eps)


def test_deterministic_posterior_has_zero_std_and_kl():
    posterior = DiagonalGaussianDistribution(moments(), deterministic=True)
    assert torch.equal(posterior.sample(), posterior.mode())
    assert torch.count_nonzero(posterior.kl()) == 0


def test_odd_channel_moments_rejected():
    with pytest.raises(ValueError, match="even channel"):
        DiagonalGaussianDistribution(torch.randn(1, 3, 2, 2))
