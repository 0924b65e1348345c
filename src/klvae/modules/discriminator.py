"""PatchGAN discriminator (pix2pix's NLayerDiscriminator) as used by LDM/taming (CompVis/taming-transformers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ActNorm", "NLayerDiscriminator", "init_discriminator_weights"]


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Glow's ActNorm).

    Unlike BatchNorm it keeps no running statistics, but its initialisation is data-dependent: under DDP
    every rank would start from its own first batch and the ranks' weights would differ from then on
    (the gradient all-reduce keeps equal weights equal, it does not make different ones equal). So the
    statistics of the first batch are those of all ranks' first batches together (one all-reduce of the
    per-channel sums, once per run; every rank runs its first discriminator forward in the same step).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # (C, B·H·W)
        # Per-channel count, sum and sum of squares, summed over ranks when there are several.
        moments = torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1), (flat**2).sum(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(moments)
        n, total, total_sq = moments
        mean = total / n
        std = ((total_sq - n * mean**2).clamp(min=0) / (n - 1)).sqrt()  # unbiased, as Tensor.std
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def init_discriminator_weights(module: nn.Module) -> None:
    """Conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0 (DCGAN's init)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, 3, 256, 256) → (B, 1, 30, 30) real/fake logits, one per overlapping 70×70 patch.

    Args:
        input_nc: image channels.
        ndf: width of the first layer (64).
        n_layers: stride-2 layers (3 → 2,765,633 parameters with BatchNorm).
        use_actnorm: ActNorm instead of BatchNorm (then convs keep their bias).
    """

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"disc_num_layers must be >= 1, got {n_layers}")

        def norm(c: int) -> nn.Module:
            return ActNorm(c) if use_actnorm else nn.BatchNorm2d(c)

        bias = use_actnorm  # a bias before BatchNorm is redundant (BN's beta absorbs it)
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
            norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(init_discriminator_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
