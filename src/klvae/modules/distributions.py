"""The diagonal Gaussian posterior q(z|x) that the encoder's moments parameterise (LDM's `DiagonalGaussianDistribution`)."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latents of shape (B, C, h, w).

    Args:
        parameters: encoder moments (B, 2C, h, w): mean and log-variance stacked on dim 1.
        deterministic: collapse to the mean (std = var = 0, kl = 0), e.g. for exact encodes.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.dim() != 4 or parameters.shape[1] % 2:
            raise ValueError(
                f"moments must be (B, 2C, h, w) with an even channel count, got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite early in training when the encoder's logvar head is untrained.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std·ε, (B, C, h, w)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(q || N(0, I)) (or against ``other``), summed over C, h, w: one value per sample, (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under q, summed over C, h, w: (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(
            log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3]
        )
