"""Exponential moving average of the autoencoder's weights (the sd-vae-ft recipe exports EMA weights)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ModuleEMA"]


class ModuleEMA(nn.Module):
    """Shadow copies of named modules, updated as ``shadow ← shadow + (1 − d)(live − shadow)``.

    The shadows are registered under the same names, so a Lightning module holding this as ``ema`` gets
    state-dict keys ``ema.decoder.conv_out.weight`` etc. that mirror the live network's keys.

    Args:
        modules: name → live module to track (e.g. encoder, decoder, quant_conv, post_quant_conv).
        decay: target decay.
        warmup: use LDM's LitEma warm-up ``min(decay, (1 + n) / (10 + n))``, n the number of updates
            *including* this one (LitEma increments first): 0.1818 on the first update, so early updates
            are not dominated by the initial weights.
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
        self.decay, self.warmup = decay, warmup
        self.names = list(modules)
        for name, module in modules.items():
            self.add_module(name, copy.deepcopy(module).requires_grad_(False))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self, modules: Mapping[str, nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shadow, live = [], []
        for name in self.names:
            for s, p in zip(getattr(self, name).parameters(), modules[name].parameters(), strict=True):
                shadow.append(s)
                live.append(p)
        return shadow, live

    def decay_for_update(self, n: int) -> float:
        """Decay used by the n-th update (n = 1 for the first), LitEma's warm-up formula."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module], skipped: torch.Tensor | None = None) -> None:
        """Move the shadows toward the live weights, unless ``skipped`` (a 0-dim bool device tensor) is true.

        The live weights did not change in a skipped update (the non-finite guard), so the average must
        not move toward them nor count the update. Everything is computed on the device, the decay's
        warm-up included: no host sync.
        """
        done = torch.ones((), dtype=torch.long, device=self.num_updates.device)
        if skipped is not None:
            done = done - skipped.to(done.device).long()
        self.num_updates += done
        n = self.num_updates.double()
        decay = (
            torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        )
        weight = ((1.0 - decay) * done).float()  # 0 for a skipped update: the shadow stays put
        # Frozen parameters (train_decoder_only's encoder) keep their shadow exactly as loaded: nothing
        # trains them, so the average must not drift toward anything.
        pairs = [(s, p) for s, p in zip(*self._pairs(modules), strict=True) if p.requires_grad]
        if pairs:
            weights = [weight.to(s.device) for s, _ in pairs]
            torch._foreach_lerp_([s for s, _ in pairs], [p.detach() for _, p in pairs], weights)

    @torch.no_grad()
    def copy_from(self, modules: Mapping[str, nn.Module]) -> None:
        """Reset the shadows to the live weights (after a warm start), buffers included (FLUX.2's latent
        BatchNorm statistics: never averaged, but the EMA copy is exported and must hold the loaded ones)."""
        shadow, live = self._pairs(modules)
        torch._foreach_copy_(shadow, live)
        for name in self.names:
            for s, b in zip(getattr(self, name).buffers(), modules[name].buffers(), strict=True):
                s.copy_(b)

    @contextmanager
    def swapped(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """Run the live modules with EMA weights inside the block (storage swap: no copies, no memory)."""
        shadow, live = self._pairs(modules)

        def swap() -> None:
            for s, p in zip(shadow, live, strict=True):
                s.data, p.data = p.data, s.data

        swap()
        try:
            yield
        finally:
            swap()
