"""Frozen vision foundation models (DINOv2, DINO, SigLIP, any timm ViT) for alignment losses and discriminators.

The network is timm's (no hand-written ViT); this module adds what a training run needs around it:

* **Offline weights.** ``path`` (a ``.safetensors`` or torch file in timm's key layout, or a layout timm's
  own checkpoint filter converts, e.g. Meta's DINOv2 release), else the Hugging Face hub cache that timm
  itself fills (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read without
  any network call; else one error line saying where it looked and how to fetch the weights.
  Random weights only with ``allow_random_backbone: true``, logged as a warning, and always the same ones
  (a fixed seed): the backbone is not in checkpoints, so a resumed run or another DDP rank must rebuild it
  identically.
* **Frozen by construction.** The timm model is held outside ``nn.Module``'s registry: it is not in
  ``parameters()``, ``state_dict()``, ``train()``, ``apply()`` or ``requires_grad_()`` of any parent, so no
  optimizer, DDP bucket, EMA or checkpoint ever sees its hundreds of MB, and a parent's strict
  ``load_state_dict`` needs no backbone keys. ``.to()``/``.cuda()``/``.half()`` still move it (``_apply``).
  It stays in eval mode with ``requires_grad=False``; gradients still flow to the *input* image (a
  discriminator's generator loss, R1's double backward).
* **Its own preprocessing.** Images in [-1, 1] are resized (see ``image_size``) and normalised with the
  mean/std of the model's timm ``pretrained_cfg`` (ImageNet's for DINO/DINOv2, 0.5/0.5 for SigLIP).

Resolution: by default inputs are resized to 224² (``image_size: 224``) as VA-VAE
(hustvl/LightningDiT ``vavae/ldm/models/foundation_models.py`` L56), lavinal712/AutoencoderKL's VF loss and
its DINO discriminator (``sgm/modules/autoencoding/discriminators/dino.py`` L166) do: DINO and SigLIP were
trained at 224 and DINOv2 mostly so (518 only in a short final phase), the cost stays fixed whatever the
training resolution (a 1024² fine-tune would otherwise give ViT-L 5,000+ tokens), and consumers resize the
token grid to what they need. ``image_size: null`` keeps the input's size, each side rounded to a multiple
of the patch size (aspect ratio kept, for non-square images). Resizing is bilinear with antialiasing (the
references use plain bilinear; at 256 → 224 the two barely differ, from 1024² plain bilinear would alias).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from klvae.errors import ConfigError
from klvae.io.files import read_tensor_file
from klvae.util import instantiate_from_config

__all__ = ["FrozenViT", "build_backbone", "double_backward_attention", "hf_hub_cache"]

log = logging.getLogger(__name__)

# The weight files timm stores on the Hugging Face hub, in the order timm's own loader prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The one seed of an explicitly random backbone: every rank and every resume builds the same weights.
RANDOM_BACKBONE_SEED = 0


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved as ``huggingface_hub`` does but at call time.

    ``$HF_HUB_CACHE``, else the legacy ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "hub"


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Run ViT forwards inside this block when their input gradient will be differentiated again.

    R1 needs ``autograd.grad(D(x).sum(), x, create_graph=True)`` and a backward of that gradient. PyTorch's
    fused attention kernels (flash / memory-efficient / CPU flash, chosen by ``scaled_dot_product_attention``
    at forward time) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math kernel is plain
    differentiable ops. Costs O(tokens²) attention memory, so use it for the R1 pass only.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _timm_name(model_name: str) -> str:
    """``hf-hub:timm/vit_large_patch14_dinov2.lvd142m`` (VA-VAE's spelling) → timm's registry name."""
    for prefix in ("hf-hub:timm/", "hf_hub:timm/", "timm/"):
        if model_name.startswith(prefix):
            return model_name[len(prefix) :]
    return model_name


def _fetch_command(name: str) -> str:
    return f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""


def _find_weights(name: str, path: str | None) -> Path | None:
    """The weight file for timm model ``name``: ``path`` if given, else the hub cache; None if none found."""
    import timm

    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"backbone path {str(file)!r} does not exist: give a .safetensors or torch file with "
                f"{name} weights in timm's layout, or drop path: to read the Hugging Face hub cache {hf_hub_cache()}"
            )
        return file
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hub_id.partition("@")
    filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else HF_WEIGHT_FILES
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_hub_cache(), revision=revision or None)
        if isinstance(found, str):  # None: not cached; a sentinel object: cached as "does not exist"
            return Path(found)
    return None


def _missing_weights_message(name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return (
            f"no weights for backbone {name!r}: timm knows no Hugging Face weights for it; set path: to a "
            "weight file in timm's layout (allow_random_backbone: true is for tests and demos only)"
        )
    repo_id = hub_id.partition("@")[0]
    cache = hf_hub_cache()
    return (
        f"no weights for backbone {name!r}: looked for {' / '.join(HF_WEIGHT_FILES)} of {repo_id} in the "
        f"Hugging Face hub cache {cache} (HF_HUB_CACHE or HF_HOME choose another); on a machine with internet "
        f"run `{_fetch_command(name)}` (or `hf download {repo_id}`) and copy the folder "
        f"models--{repo_id.replace('/', '--')} into {cache}, or set path: to a weight file in timm's layout "
        "(allow_random_backbone: true is for tests and demos only)"
    )


def _create(name: str, state_dict: Mapping[str, torch.Tensor] | None, kwargs: dict[str, Any]) -> nn.Module:
    """timm's model, with ``state_dict`` loaded through timm's own pretrained path (its checkpoint filter,
    position-embedding resampling to ``img_size``, strict key check), or a seeded random init."""
    import timm

    # A fixed seed in a forked RNG: the same random init everywhere, and the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_BACKBONE_SEED)
        if state_dict is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)}, **kwargs
        )
    model.pretrained_cfg.pop("state_dict", None)  # it would keep a second copy of the weights alive
    return model


class FrozenViT(nn.Module):
    """A frozen timm ViT that maps images in [-1, 1] to patch-feature grids.

    Args:
        model_name: a timm model name, e.g. ``vit_large_patch14_dinov2.lvd142m`` (VA-VAE's),
            ``vit_small_patch14_reg4_dinov2.lvd142m``, ``vit_small_patch16_224.dino`` (DINO v1),
            ``vit_base_patch16_siglip_224.webli``; ``hf-hub:timm/<name>`` is accepted too.
        path: a weight file (``.safetensors`` or torch) to load instead of looking in the hub cache.
        allow_random_backbone: if no weights are found, build seeded random ones (with a warning) instead of
            failing. For tests and demos: the features then mean nothing.
        image_size: the square side inputs are resized to (a multiple of the patch size; default 224 as
            the references), or ``None`` to keep the input's size rounded to multiples of the patch size.
        normalize_input: map [-1, 1] to the model's own mean/std (timm ``pretrained_cfg``). VA-VAE
            (LightningDiT ``vavae/ldm/models/foundation_models.py`` L54-57) and lavinal712's ``vf_loss.py``
            feed [-1, 1] to DINOv2 unnormalised; ``false`` reproduces that.
        model_kwargs: extra ``timm.create_model`` keywords (tests: ``depth``, ``embed_dim``, ``num_heads``).

    Raises:
        ConfigError: unknown model, not a ViT with patch features, a bad ``image_size``.
        FileNotFoundError: no weights and ``allow_random_backbone`` false (one line: where it looked, how to
            fetch them); ``path`` does not exist.
        ValueError: a weight file that is unreadable or does not fit the model.
    """

    def __init__(
        self,
        model_name: str,
        path: str | None = None,
        allow_random_backbone: bool = False,
        image_size: int | None = 224,
        normalize_input: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        name = _timm_name(model_name)
        if not timm.is_model(name):
            arch = name.split(".")[0].split("_")
            hint = f"'*{arch[-1]}*'" if arch else "'vit_*'"
            raise ConfigError(
                f"backbone model_name {model_name!r} is not a timm model; see timm.list_models({hint})"
            )
        kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
        if image_size is not None:
            kwargs["img_size"] = image_size  # position embeddings resampled once at load, not every forward
        kwargs.update(model_kwargs or {})

        weights = _find_weights(name, path)
        if weights is None and not allow_random_backbone:
            raise FileNotFoundError(_missing_weights_message(name))
        if weights is None:
            vit = _create(name, None, kwargs)
            log.warning(
                "backbone %s has RANDOMLY INITIALISED weights (allow_random_backbone: true, no weights found): "
                "its features mean nothing; use this for tests and demos only",
                name,
            )
            self.weights_source = "random"
        else:
            state = read_tensor_file(weights).tensors
            try:
                vit = _create(name, state, kwargs)
            except RuntimeError as e:  # strict load: missing/unexpected keys or shape mismatches
                detail = " ".join(str(e).split())[:300]
                raise ValueError(
                    f"{weights} does not hold {name} weights in timm's layout: {detail}"
                ) from None
            log.info("backbone %s weights loaded from %s", name, weights)
            self.weights_source = str(weights)

        if not (hasattr(vit, "forward_intermediates") and hasattr(vit, "patch_embed")):
            raise ConfigError(
                f"backbone {name!r} is not a ViT with patch features (no forward_intermediates)"
            )
        patch = tuple(vit.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ConfigError(
                f"backbone {name!r} has non-square patches {patch}; only square ones are supported"
            )
        if image_size is not None and (image_size <= 0 or image_size % patch[0]):
            raise ConfigError(
                f"backbone image_size {image_size!r} must be a positive multiple of the patch size {patch[0]}"
            )

        vit.requires_grad_(False).eval()
        # Not registered as a submodule (see the module docstring): object.__setattr__ bypasses nn.Module's.
        object.__setattr__(self, "_vit", vit)
        self.model_name = name
        self.image_size = image_size
        self.patch_size: int = patch[0]
        self.width: int = vit.embed_dim
        self.depth: int = len(vit.blocks)

        # [-1, 1] → (x01 - mean) / std as one multiply-add: x01 = (x + 1) / 2.
        mean = torch.tensor(
            vit.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)) if normalize_input else (0.5,) * 3
        )
        std = torch.tensor(vit.pretrained_cfg.get("std", (0.5, 0.5, 0.5)) if normalize_input else (0.5,) * 3)
        self.register_buffer("input_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    # --- nn.Module plumbing for the unregistered model -------------------------------------------------

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._vit._apply(fn, recurse)  # .to(device/dtype), .cuda(), .half() reach the frozen model too
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenViT:
        super().train(mode)
        self._vit.eval()  # frozen: dropout/drop-path stay off whatever the parent does
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.model_name}, width={self.width}, depth={self.depth}, patch={self.patch_size}, "
            f"image_size={self.image_size}, weights={self.weights_source} (frozen, not in state_dict)"
        )

    # --- features ---------------------------------------------------------------------------------------

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an input image of this size is resized to before the ViT."""
        if self.image_size is not None:
            return self.image_size, self.image_size
        p = self.patch_size
        return max(p, round(height / p) * p), max(p, round(width / p) * p)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (h, w) of the features for an input image of this size."""
        h, w = self.input_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 3, H', W') resized and normalised as the ViT expects."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images (B, 3, H, W), got shape {tuple(images.shape)}")
        size = self.input_size(images.shape[-2], images.shape[-1])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images * self.input_scale + self.input_shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Last-layer patch features, after the final norm (what ``forward_features`` gives, prefix tokens
        (class, registers) dropped): the target of VA-VAE's VF loss.

        Args:
            images: (B, 3, H, W) in [-1, 1].

        Returns:
            (B, width, h, w) with (h, w) = ``grid_size(H, W)``.
        """
        (features,) = self._vit.forward_intermediates(
            self.preprocess(images), indices=[self.depth - 1], norm=True, intermediates_only=True
        )
        return features

    def block_features(self, images: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the given transformer blocks (0-based, negative from the end; repeats allowed), before
        the final norm, prefix tokens dropped: the inputs of a multi-layer feature discriminator.

        Args:
            images: (B, 3, H, W) in [-1, 1].
            blocks: block indices, e.g. ``(2, 5, 8, 11)``.

        Returns:
            One (B, width, h, w) tensor per entry of ``blocks``, in that order.
        """
        wanted = [self.block_index(b) for b in blocks]
        taken = sorted(set(wanted))
        # timm returns the taken blocks in depth order, once each; stop_early skips blocks past the last.
        outputs = self._vit.forward_intermediates(
            self.preprocess(images), indices=taken, norm=False, stop_early=True, intermediates_only=True
        )
        by_block = dict(zip(taken, outputs, strict=True))
        return [by_block[b] for b in wanted]

    def block_index(self, block: int) -> int:
        """``block`` as a non-negative index; ConfigError if the model has no such block."""
        if not -self.depth <= block < self.depth:
            raise ConfigError(
                f"backbone block {block!r} does not exist: {self.model_name} has {self.depth} blocks"
            )
        return block % self.depth


def build_backbone(config: Mapping[str, Any] | FrozenViT) -> FrozenViT:
    """A backbone from its ``{target, params}`` block (validated like every block), or one already built.

    Example block::

        target: klvae.modules.backbones.FrozenViT
        params: {model_name: vit_large_patch14_dinov2.lvd142m, image_size: 224}
    """
    if isinstance(config, FrozenViT):
        return config
    backbone = instantiate_from_config(config)
    if not isinstance(backbone, FrozenViT):
        raise ConfigError(f"backbone target {config.get('target')!r} does not build a FrozenViT")
    return backbone
