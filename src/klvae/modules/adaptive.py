"""Adaptive loss weights without extra backward passes: LDM's GAN weight λ and VA-VAE's VF weight.

Both weights are ratios of gradient norms at one layer's weight W (LDM/taming ``calculate_adaptive_weight``:
the decoder's last conv; VA-VAE ``calculate_adaptive_weight_vf``: the encoder's last conv). The reference
code gets each gradient with ``autograd.grad(loss, W, retain_graph=True)``, which runs the backward of
everything between the loss and W once more per term — and through a compiled region it runs the whole
region's backward and fails on donated buffers. Here the gradient is taken only down to the layer's
*output* y (cheap: the graph above y is small), and ∂L/∂W follows from y = conv(h, W) as
``conv2d_weight(h, W.shape, ∂L/∂y)`` with h the layer's input, which the network returns when asked
(``Encoder/Decoder.forward(..., return_last_input=True)``).

:func:`through_output` then builds a loss whose single backward sends the already-known ∂L/∂y down into the
network, so the objective is still differentiated once. :func:`two_passes` splits one backward into two at
the decoder's input, for weights that must be known before the encoder's backward (VA-VAE's VF weight
balances the gradient the decoder sends back against the VF term's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LastLayer", "gradient_norm_ratio", "through_output", "two_passes"]


@dataclass
class LastLayer:
    """A network's last convolution with the input and output it had in this forward pass.

    Attributes:
        conv: the ``conv_out`` (its stride/padding/dilation/groups are read here).
        inputs: its input h, (B, C, H, W).
        outputs: its output y (B, C', H, W); None when the caller differentiates down to y itself.
    """

    conv: nn.Conv2d
    inputs: torch.Tensor
    outputs: torch.Tensor | None = None

    def weight_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """∂L/∂W (fp32, W's shape) from ∂L/∂y (B, C', H, W)."""
        conv = self.conv
        return torch.nn.grad.conv2d_weight(
            self.inputs.detach().float(), conv.weight.shape, grad_output.float(),
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        )  # fmt: skip


def gradient_norm_ratio(
    reference: torch.Tensor, term: torch.Tensor, eps: float = 1e-4, max_value: float = 1e4
) -> torch.Tensor:
    """clamp(‖reference‖ / (‖term‖ + eps), 0, max_value), detached: the adaptive weight of ``term``.

    LDM's λ uses eps 1e-4 and max 1e4; VA-VAE's VF weight eps 1e-4 and max 1e8.
    """
    ratio = torch.linalg.vector_norm(reference) / (torch.linalg.vector_norm(term) + eps)
    return torch.clamp(ratio, 0.0, max_value).detach()


def through_output(
    value: torch.Tensor,
    output: torch.Tensor,
    grad_output: torch.Tensor,
    params: Sequence[torch.Tensor] = (),
    param_grads: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """A scalar equal to ``value`` whose backward sends ``grad_output`` into ``output`` (and each of
    ``param_grads`` into its parameter): the part of an objective above ``output`` was already
    differentiated, so its graph is not needed (nor run) again.
    """
    surrogate = (output * grad_output.detach()).sum()
    for p, g in zip(params, param_grads, strict=True):
        surrogate = surrogate + (p * g.detach()).sum()
    return value.detach() + (surrogate - surrogate.detach())


class _TwoPasses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, value: torch.Tensor, passes: Callable) -> torch.Tensor:
        ctx.passes = passes
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        with torch.enable_grad():  # autograd runs backward functions with grad mode off
            ctx.passes(grad)
        ctx.passes = None  # drop the closure (and the graphs it holds) once run
        return None, None, None


def two_passes(value: torch.Tensor, passes: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """A scalar equal to ``value`` whose ``backward()`` calls ``passes(grad)``, which runs the backward itself.

    ``grad`` is the gradient this scalar receives (the loss scale and accumulation factor a Lightning
    ``manual_backward`` applied); ``passes`` must run the whole objective's backward with it, in as many
    reentrant ``torch.autograd.backward`` calls as it needs. ``value``'s own graph is never traversed: the
    result hangs on a fresh leaf that receives no gradient.
    """
    anchor = torch.zeros((), device=value.device, requires_grad=True)
    return _TwoPasses.apply(anchor, value.detach(), passes)
