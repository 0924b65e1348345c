"""Tensor names: LDM's layout, the prefixes around it, and the one table that renames it to diffusers' and back.

klvae's network uses LDM's names (CompVis/latent-diffusion ``first_stage_model``; FLUX.1's ``ae.safetensors``
uses the same). Stable Diffusion checkpoints keep them under ``first_stage_model.``; klvae run checkpoints add
``loss.*`` and ``ema.*``. diffusers' ``AutoencoderKL`` renames the same tensors; :data:`LDM_TO_DIFFUSERS` is a
bijection for the kl-f8 family, read left to right for export and right to left for import. FLUX.2's latent
BatchNorm is ``bn.*`` in all three layouts; FLUX.2's own ``ae.safetensors`` (black-forest-labs/flux2) keeps the
quant convs inside the encoder and decoder (:data:`FLUX2_NESTED_QUANT_CONVS`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache

import torch

__all__ = [
    "BATCH_NORM_PREFIX",
    "EMA_PREFIX",
    "FIRST_STAGE_PREFIX",
    "FLUX2_NESTED_QUANT_CONVS",
    "LDM_TO_DIFFUSERS",
    "LOSS_PREFIX",
    "NETWORK_PREFIXES",
    "diffusers_to_ldm",
    "flux2_to_ldm",
    "is_diffusers_layout",
    "is_flux2_layout",
    "is_ldm_layout",
    "ldm_to_diffusers",
    "ldm_to_flux2",
    "network_tensors",
    "num_levels",
    "rename_key",
    "strip_first_stage",
]

FIRST_STAGE_PREFIX = "first_stage_model."  # SD/LDM full checkpoints
EMA_PREFIX = "ema."  # klvae run checkpoints: EMA copy of the network
LOSS_PREFIX = "loss."  # LDM/klvae training checkpoints: discriminator, LPIPS, logvar
BATCH_NORM_PREFIX = "bn."  # FLUX.2's latent BatchNorm (running_mean, running_var, num_batches_tracked)
NETWORK_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", BATCH_NORM_PREFIX)
# (LDM name prefix, FLUX.2 ae.safetensors prefix): black-forest-labs/flux2's Encoder owns quant_conv and its
# Decoder post_quant_conv; every other name is LDM's.
FLUX2_NESTED_QUANT_CONVS: tuple[tuple[str, str], ...] = (
    ("quant_conv.", "encoder.quant_conv."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
)

# (LDM name prefix, diffusers name prefix). {i}: level in execution order; {u}: LDM's decoder level, which
# counts by resolution (up.{L-1} runs first), so u = L - 1 - i; {j}: block in the level; {P}: encoder|decoder.
# The first matching row renames a key's start; the rest of the name is kept (see _SEGMENTS).
LDM_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{u}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    ("{P}.mid.block_1.", "{P}.mid_block.resnets.0."),
    ("{P}.mid.block_2.", "{P}.mid_block.resnets.1."),
    ("{P}.mid.attn_1.norm.", "{P}.mid_block.attentions.0.group_norm."),
    ("{P}.mid.attn_1.q.", "{P}.mid_block.attentions.0.to_q."),
    ("{P}.mid.attn_1.k.", "{P}.mid_block.attentions.0.to_k."),
    ("{P}.mid.attn_1.v.", "{P}.mid_block.attentions.0.to_v."),
    ("{P}.mid.attn_1.proj_out.", "{P}.mid_block.attentions.0.to_out.0."),
    ("{P}.norm_out.", "{P}.conv_norm_out."),
)
# diffusers < 0.14 saved the mid attention as query/key/value/proj_attn; such files are read, never written.
_LEGACY_DIFFUSERS_ATTENTION: tuple[tuple[str, str], ...] = (
    ("{P}.mid.attn_1.q.", "{P}.mid_block.attentions.0.query."),
    ("{P}.mid.attn_1.k.", "{P}.mid_block.attentions.0.key."),
    ("{P}.mid.attn_1.v.", "{P}.mid_block.attentions.0.value."),
    ("{P}.mid.attn_1.proj_out.", "{P}.mid_block.attentions.0.proj_attn."),
)
# Renamed wherever they occur inside a block: the 1×1 skip conv of a ResnetBlock whose width changes.
_SEGMENTS: tuple[tuple[str, str], ...] = ((".nin_shortcut.", ".conv_shortcut."),)
# LDM's mid-attention projections are 1×1 convs, (C, C, 1, 1); diffusers' are nn.Linear, (C, C).
_ATTENTION_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_FIELDS = {"i": r"\d+", "u": r"\d+", "j": r"\d+", "P": "encoder|decoder"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, rx in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(pattern)


def rename_key(key: str, levels: int, to_diffusers: bool) -> str:
    """One tensor name from LDM's layout to diffusers' (``to_diffusers``) or back; ``levels`` = len(ch_mult).

    Names that both layouts share (``encoder.conv_in.weight``, ``quant_conv.bias`` ...) come back unchanged.
    """
    rows = LDM_TO_DIFFUSERS if to_diffusers else (*LDM_TO_DIFFUSERS, *_LEGACY_DIFFUSERS_ATTENTION)
    for ldm, diffusers in rows:
        source, target = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        m = _pattern(source).match(key)
        if m is None:
            continue
        fields = m.groupdict()
        if "u" in fields:
            fields["i"] = str(levels - 1 - int(fields["u"]))
        elif "i" in fields:
            fields["u"] = str(levels - 1 - int(fields["i"]))
        key = target.format(**fields) + key[m.end() :]
        break
    for ldm, diffusers in _SEGMENTS:
        key = key.replace(*((ldm, diffusers) if to_diffusers else (diffusers, ldm)))
    return key


def num_levels(keys: Iterable[str], diffusers: bool = False) -> int:
    """Resolution levels of the decoder (``len(ch_mult)``), from the names of an LDM or diffusers state dict."""
    pattern = r"^decoder\.up_blocks\.(\d+)\." if diffusers else r"^decoder\.up\.(\d+)\."
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise ValueError(f"no keys match {pattern!r}: not a complete VAE state dict")
    return max(found) + 1


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-layout network state dict → diffusers ``AutoencoderKL``'s (same tensors, renamed).

    The mid-block attention projections are squeezed from (C, C, 1, 1) to (C, C). Non-network keys
    (``loss.*``) must be removed beforehand.
    """
    levels = num_levels(state_dict)
    out = {}
    for key, value in state_dict.items():
        if _ATTENTION_WEIGHT.search(key):
            value = value.reshape(value.shape[0], value.shape[1])
        out[rename_key(key, levels, to_diffusers=True)] = value
    return out


def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict → LDM layout (attention weights back to (C, C, 1, 1))."""
    levels = num_levels(state_dict, diffusers=True)
    out = {}
    for key, value in state_dict.items():
        new = rename_key(key, levels, to_diffusers=False)
        if _ATTENTION_WEIGHT.search(new) and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def ldm_to_flux2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-layout network state dict → FLUX.2's ``ae.safetensors`` names (quant convs nested)."""
    return {_swap_prefix(k, FLUX2_NESTED_QUANT_CONVS, to_flux2=True): v for k, v in state_dict.items()}


def flux2_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLUX.2's ``ae.safetensors`` names → LDM layout (``encoder.quant_conv.*`` → ``quant_conv.*`` ...)."""
    return {_swap_prefix(k, FLUX2_NESTED_QUANT_CONVS, to_flux2=False): v for k, v in state_dict.items()}


def _swap_prefix(key: str, rows: tuple[tuple[str, str], ...], to_flux2: bool) -> str:
    for ldm, flux2 in rows:
        source, target = (ldm, flux2) if to_flux2 else (flux2, ldm)
        if key.startswith(source):
            return target + key[len(source) :]
    return key


def is_flux2_layout(keys: Iterable[str]) -> bool:
    """Whether these names are FLUX.2's own (``encoder.quant_conv.weight``: no other layout nests it)."""
    return any(k.startswith(tuple(flux2 for _, flux2 in FLUX2_NESTED_QUANT_CONVS)) for k in keys)


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """Whether these names are diffusers' (``encoder.down_blocks.0.resnets.0.conv1.weight`` ...)."""
    return any(
        k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys
    )


def is_ldm_layout(keys: Iterable[str]) -> bool:
    """Whether these names hold an LDM-layout network, bare or under ``first_stage_model.`` / ``ema.``."""
    pattern = re.compile(rf"^({re.escape(FIRST_STAGE_PREFIX)}|{re.escape(EMA_PREFIX)})?encoder\.down\.")
    return any(pattern.match(k) for k in keys)


def strip_first_stage(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's part of an SD/LDM checkpoint: keys under ``first_stage_model.`` with the prefix
    removed when there are any (a full diffusion checkpoint); otherwise the state dict unchanged."""
    if not any(k.startswith(FIRST_STAGE_PREFIX) for k in state_dict):
        return dict(state_dict)
    n = len(FIRST_STAGE_PREFIX)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)}


def network_tensors(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The network's tensors (``encoder.*``, ``decoder.*``, quant convs, ``bn.*``) under ``prefix``, prefix removed.

    ``prefix=""`` takes the live network of a run checkpoint, ``"ema."`` its EMA copy.
    """
    n = len(prefix)
    return {
        k[n:]: v for k, v in state_dict.items() if k.startswith(prefix) and k[n:].startswith(NETWORK_PREFIXES)
    }
