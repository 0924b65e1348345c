"""AutoencoderKL: the KL-f8 VAE as a LightningModule with two optimizers in manual optimization.

One *training iteration* is one update round: ``accumulate_grad_batches`` batches (1 by default, so a
batch). ``disc_start``, the alternation and every cadence count iterations (:attr:`AutoencoderKL.iteration`),
never ``trainer.global_step``, which in Lightning 2 counts every optimizer step (two per batch in the
``every_batch`` schedule) and would silently halve ``disc_start``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from klvae.errors import ConfigError
from klvae.evaluation.metrics import reconstruction_scores
from klvae.interop.configs import network_from_state_dict
from klvae.interop.discriminator import check_discriminator_fits, read_discriminator_weights
from klvae.interop.formats import VAEWeights, read_vae_weights
from klvae.interop.keys import NETWORK_PREFIXES
from klvae.models.ema import ModuleEMA
from klvae.models.lr_schedule import LRSchedule
from klvae.models.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from klvae.modules.adaptive import LastLayer
from klvae.modules.config import NetworkConfig
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.equivariance import Branch, EquivarianceSchedule
from klvae.modules.losses import LatentCut, TrainingObjective
from klvae.modules.vae import KLAutoencoder
from klvae.perf.apply import AppliedOptimizations, apply_runtime_optimizations, make_adam
from klvae.perf.options import parse_optimizations
from klvae.util import instantiate_from_config, to_container

__all__ = ["AutoencoderKL", "NonFiniteTrainingError"]

log = logging.getLogger(__name__)

_SCHEDULES = ("alternate", "every_batch")


@dataclass
class _Forward:
    """One training forward pass: what the objective needs besides the images."""

    reconstructions: torch.Tensor  # x̂ (B, 3, H, W)
    posterior: DiagonalGaussianDistribution
    latents: torch.Tensor  # the posterior sample z (B, C, h, w)
    decoder_last_layer: LastLayer  # for LDM's adaptive GAN weight
    latent_cut: LatentCut | None  # for adaptive latent-term weights (VA-VAE's VF loss)


def _check_quant_convs(
    path: str, weights: VAEWeights, use_quant_conv: bool | None, use_post_quant_conv: bool | None
) -> None:
    """A configured quant conv that the warm-start file lacks (or the reverse) is one clear error."""
    given = {"use_quant_conv": use_quant_conv, "use_post_quant_conv": use_post_quant_conv}
    convs = [
        f"{name}: file {getattr(weights.network, name)} vs config {value}"
        for name, value in given.items()
        if value is not None and value != getattr(weights.network, name)
    ]
    if convs:
        raise ValueError(
            f"{path} and the config disagree on the quant convs ({'; '.join(convs)}; file embed_dim "
            f"{weights.network.embed_dim}). Use a recipe for this VAE family, or set model.params.use_quant_conv / "
            "use_post_quant_conv to null to take the file's."
        )


class AutoencoderKL(KLAutoencoder, pl.LightningModule):
    """KL-regularised autoencoder (LDM's ``first_stage_model``) with its GAN training recipe.

    State-dict keys match LDM's (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
    ``loss.*``), plus ``ema.*`` when EMA is on; without quant convs their keys are absent (SD3/FLUX.1).

    Args:
        ddconfig: network config in LDM's vocabulary (see :class:`klvae.modules.model.Encoder`); None
            reads it from ``ckpt_path`` (fine-tunes: the network is whatever the checkpoint holds).
        lossconfig: ``{target, params}`` of the loss, normally
            :class:`klvae.modules.losses.LPIPSWithDiscriminator`.
        embed_dim: posterior channels (4; 16 for SD3/FLUX.1).
        use_quant_conv: 1×1 conv from the encoder's moments to the posterior; False as in SD3/FLUX.1 (the
            moments are the posterior, ``embed_dim == z_channels``). None: the ``ckpt_path`` file's, else True.
        use_post_quant_conv: 1×1 conv from latents into the decoder; None as for ``use_quant_conv``.
        learning_rate: discriminator lr; the CLI overwrites it with the ``--scale_lr`` result.
        lr_g_factor: autoencoder lr = ``lr_g_factor · learning_rate``.
        adam_betas: Adam betas of both optimizers.
        update_schedule: ``"alternate"`` (default: after disc_start even iterations update the autoencoder,
            odd ones the discriminator) or ``"every_batch"`` (LDM: one forward, both updates).
        accumulate_grad_batches: batches per update round (Lightning cannot do this in manual mode).
        gradient_clip_val: clip each optimizer's gradient norm to this value (None: off), after unscaling
            under ``16-mixed`` (in :meth:`on_before_optimizer_step`).
        max_nonfinite_in_a_row: an update whose loss or gradient is not finite is skipped (no optimizer
            step, no EMA update; counted as ``train/skipped_nonfinite``, on every DDP rank alike); this many
            skipped updates in a row of one optimizer stop the run with :class:`NonFiniteTrainingError`.
        ema_decay: keep an EMA of the autoencoder weights, used for validation, images and export.
        train_decoder_only: freeze encoder and quant_conv when present (the sd-vae-ft recipe).
        ckpt_path: warm start from an LDM/SD/klvae checkpoint, a klvae export or diffusers weights
            (``first_stage_model.`` prefix handled). A given ``ddconfig`` is checked against it.
        ckpt_use_ema: for a klvae run checkpoint with EMA weights: None (default) starts from its EMA
            weights (what ``klvae-export`` wrote), False from its live weights, True requires EMA weights.
        ignore_keys: key prefixes to drop from ``ckpt_path`` (e.g. ``["loss.discriminator"]``).
        disc_ckpt_path: warm-start the discriminator (any type) from a klvae/LDM training checkpoint
            (``loss.discriminator.*``) or a ``klvae-export --include-discriminator`` file; applied after
            ``ckpt_path``. Keys that do not fit the configured discriminator are a config error naming them.
        image_key: batch key of the images, (B, 3, H, W) float in [-1, 1].
        monitor: metric for best-checkpoint selection.
        lr_schedule: learning-rate warm-up and decay for both optimizers, counted in iterations, e.g.
            ``{warmup_iterations: 1000, decay: cosine, total_iterations: 250000}``; keys in
            :class:`klvae.models.lr_schedule.LRSchedule`. None: constant (LDM).
        optimizations: speed/memory switches (torch.compile, fused Adam, channels_last, LPIPS target
            without autograd, gradient checkpointing, cudnn.benchmark); keys and defaults in
            :class:`klvae.perf.options.Optimizations`, an unknown key is a ``ValueError``.
        equivariance: EQ-VAE's equivariance regularisation (arXiv:2502.09509), off when None (default):
            ``{p, p_small, anisotropic, seed}`` of :class:`klvae.modules.equivariance.EquivarianceSchedule`.
            Per batch, with probability ``p``, the decoder gets τ(z) (posterior sample downscaled, then
            rotated) and the loss, including the discriminator update on that batch, compares with τ(x);
            else, with probability ``p_small``, the batch is downscaled before encoding.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any] | None,
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        learning_rate: float = 4.5e-6,
        lr_g_factor: float = 1.0,
        adam_betas: Sequence[float] = (0.5, 0.9),
        update_schedule: str = "alternate",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        train_decoder_only: bool = False,
        ckpt_path: str | None = None,
        ckpt_use_ema: bool | None = None,
        ignore_keys: Sequence[str] = (),
        disc_ckpt_path: str | None = None,
        image_key: str = "image",
        monitor: str | None = "val/rec_loss",
        optimizations: Mapping[str, Any] | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        max_nonfinite_in_a_row: int = 20,
        equivariance: Mapping[str, Any] | None = None,
        use_quant_conv: bool | None = None,
        use_post_quant_conv: bool | None = None,
    ) -> None:
        if update_schedule not in _SCHEDULES:
            raise ValueError(f"update_schedule must be one of {_SCHEDULES}, got {update_schedule!r}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(
                f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches!r}"
            )
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val!r}")
        if len(adam_betas) != 2 or not all(0 <= beta < 1 for beta in adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(adam_betas)!r}")
        for name, value in (("learning_rate", learning_rate), ("lr_g_factor", lr_g_factor)):
            if not value > 0:  # Adam would reject it only at the start of fit
                raise ValueError(f"{name} must be > 0, got {value!r}")
        lossconfig = to_container(lossconfig)
        lr_schedule = to_container(lr_schedule)
        warm_start = None
        if ckpt_path is not None:  # a given ddconfig skips shape inference (checked against the file below)
            given = to_container(ddconfig) if ddconfig is not None else None
            warm_start = read_vae_weights(ckpt_path, ddconfig=given, use_ema=ckpt_use_ema)
            if ckpt_use_ema and not warm_start.used_ema:
                raise ValueError(
                    f"ckpt_use_ema is true but {ckpt_path} ({warm_start.source_format}) has no EMA weights; "
                    "set model.params.ckpt_use_ema to null (EMA when present) or false"
                )
        if ddconfig is None:
            if warm_start is None:
                raise ValueError("ddconfig is null: give the network config, or a ckpt_path to read it from")
            ddconfig = warm_start.network.ddconfig()
            log.info("network read from %s: ddconfig=%s", ckpt_path, ddconfig)
        ddconfig = to_container(ddconfig)
        # None: the warm-start file's convs (present or absent), else kl-f8's (present).
        if warm_start is not None:
            _check_quant_convs(str(ckpt_path), warm_start, use_quant_conv, use_post_quant_conv)
        if use_quant_conv is None:
            use_quant_conv = warm_start.network.use_quant_conv if warm_start is not None else True
        if use_post_quant_conv is None:
            use_post_quant_conv = warm_start.network.use_post_quant_conv if warm_start is not None else True
        # The network (KLAutoencoder: encoder, quant convs, decoder); nothing may be set on self before this.
        super().__init__(NetworkConfig.from_params(ddconfig, embed_dim, use_quant_conv, use_post_quant_conv))
        if self.network.out_ch != self.network.in_channels:  # the loss compares x̂ with x channel by channel
            raise ValueError(f"ddconfig.out_ch={self.network.out_ch} must equal ddconfig.in_channels="
                             f"{self.network.in_channels}: training compares the reconstruction with its input")  # fmt: skip
        self.lr_schedule = LRSchedule.from_config(lr_schedule)
        opts = None if optimizations is None else to_container(optimizations)
        self.optimizations = parse_optimizations(opts)
        # Plain containers only: a DictConfig in hparams would break torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "ddconfig": ddconfig,
                "lossconfig": lossconfig,
                "embed_dim": embed_dim,
                "use_quant_conv": use_quant_conv,
                "use_post_quant_conv": use_post_quant_conv,
                "learning_rate": learning_rate,
                "lr_g_factor": lr_g_factor,
                "adam_betas": list(adam_betas),
                "update_schedule": update_schedule,
                "accumulate_grad_batches": accumulate_grad_batches,
                "gradient_clip_val": gradient_clip_val,
                "ema_decay": ema_decay,
                "train_decoder_only": train_decoder_only,
                "image_key": image_key,
                "monitor": monitor,
                "optimizations": self.optimizations.to_dict(),
                "lr_schedule": lr_schedule,
                "max_nonfinite_in_a_row": max_nonfinite_in_a_row,
                "equivariance": None if equivariance is None else to_container(equivariance),
            }
        )
        self.automatic_optimization = False  # two optimizers: Lightning 2 has no optimizer_idx
        self.learning_rate = learning_rate
        self.lr_g_factor = lr_g_factor
        self.adam_betas = tuple(adam_betas)
        self.update_schedule = update_schedule
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.train_decoder_only = train_decoder_only
        self.image_key = image_key
        self.monitor = monitor

        self.equivariance = (
            None if equivariance is None else EquivarianceSchedule.from_config(to_container(equivariance))
        )
        self._downsample_factor = self.network.downsampling  # image side / latent side

        self.loss: TrainingObjective = instantiate_from_config(lossconfig)
        if train_decoder_only and self.loss.trains_encoder:
            raise ConfigError(
                "model.params.train_decoder_only is true, but model.params.lossconfig has a term that trains "
                "the encoder (e.g. the VF loss in lossconfig.params.terms): set train_decoder_only to false "
                "or remove the term"
            )
        if self.optimizations.gradient_checkpointing:
            self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True
        self.loss.lpips_target_no_grad = self.optimizations.lpips_target_no_grad
        self._check_region_names()
        self.applied_optimizations: AppliedOptimizations | None = None  # set on_fit_start
        self.ema = ModuleEMA(self.codec_modules(), decay=ema_decay) if ema_decay is not None else None
        if warm_start is not None:
            self.init_from_ckpt(str(ckpt_path), ignore_keys, warm_start)
        if disc_ckpt_path is not None:
            self.init_discriminator_from(disc_ckpt_path)
        if train_decoder_only:
            self.encoder.requires_grad_(False)
            self.quant_conv.requires_grad_(False)  # no-op without quant convs (Identity has no parameters)

        # Training progress in iterations; saved in checkpoint["klvae"] (plain ints, weights_only-safe).
        self._iteration = 0
        self._micro_step = 0
        self._disc_updates = 0  # discriminator updates so far (the lazy R1 clock)
        self._unwritten_logs: dict[str, torch.Tensor] = {}  # see _with_unwritten
        # Non-finite guard, on the device so that no step waits for the host (klvae.models.nonfinite).
        self.nonfinite = NonFiniteGuard(("autoencoder", "discriminator"), max_nonfinite_in_a_row)

    # ------------------------------------------------------------------ basics
    @property
    def iteration(self) -> int:
        """Completed training iterations (update rounds), the clock of disc_start and all cadences."""
        return self._iteration

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.image_key not in batch:
            raise ConfigError(
                f"batch has no key {self.image_key!r} (keys: {sorted(batch)}); set model.params.image_key "
                "to the data's image key (data.params.image_key)"
            )
        x = batch[self.image_key]
        if x.dim() != 4 or x.shape[1] != self.encoder.conv_in.in_channels:
            raise ConfigError(
                f"batch[{self.image_key!r}] must be (B, {self.encoder.conv_in.in_channels}, H, W) float in [-1, 1] "
                f"(model.params.ddconfig.in_channels), got shape {tuple(x.shape)}; set in_channels to the "
                "images' channels (3 for RGB), and permute BHWC data to BCHW"
            )
        return x.float()

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """Inside the block the network runs with EMA weights (no-op without EMA)."""
        with self.ema.swapped(self.codec_modules()) if self.ema is not None else nullcontext():
            yield

    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), weights: VAEWeights | None = None
    ) -> None:
        """Warm start from an LDM/SD/klvae checkpoint; every network tensor must be present and fit.

        Any format :func:`klvae.interop.formats.read_vae_weights` reads (``weights`` when the caller has read
        it already; a klvae run's EMA weights when it has them, see ``ckpt_use_ema``), plus the file's
        ``loss.*`` tensors (LDM's discriminator and logvar) when it has them. The EMA, when on, starts from
        the loaded weights: a fine-tune averages from where it starts.
        """
        weights = weights if weights is not None else read_vae_weights(path)
        ignore = tuple(ignore_keys)

        def kept(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v for k, v in tensors.items() if not (ignore and k.startswith(ignore))}

        network, loss_state = kept(weights.state_dict), kept(weights.loss_state_dict)
        self._check_network_fits(path, weights, network)
        missing, unexpected = self.load_state_dict({**network, **loss_state}, strict=False)
        missing_net = [k for k in missing if k.startswith(NETWORK_PREFIXES)]
        if missing_net:
            raise ValueError(
                f"{path} lacks {len(missing_net)} autoencoder tensors (first: {missing_net[:5]}); it is not an "
                "LDM/SD kl-f8 checkpoint for this ddconfig"
            )
        if self.ema is not None:
            self.ema.copy_from(self.codec_modules())
        log.info(
            "warm start from %s (%s%s): %d tensors loaded; not in file: %s; ignored from file: %s",
            path,
            weights.source_format,
            ", EMA weights" if weights.used_ema else "",
            len(network) + len(loss_state) - len(unexpected),
            sorted({".".join(k.split(".")[:2]) for k in missing if not k.startswith("ema.")}) or "none",
            unexpected[:10] or "none",
        )

    def init_discriminator_from(self, path: str) -> None:
        """Load the discriminator's weights from ``path`` (see ``disc_ckpt_path``), every key checked."""
        weights, recorded = read_discriminator_weights(path)
        check_discriminator_fits(path, self.loss.discriminator.state_dict(), weights, recorded)
        self.loss.discriminator.load_state_dict(weights)
        log.info("discriminator warm start from %s: %d tensors", path, len(weights))

    def _check_network_fits(
        self, path: str, weights: VAEWeights, network: Mapping[str, torch.Tensor]
    ) -> None:
        """A clear error when the configured network is not the checkpoint's (instead of a size mismatch)."""
        own = self.state_dict()
        wrong = [
            f"{k}: file {tuple(v.shape)} vs config {tuple(own[k].shape)}"
            for k, v in network.items()
            if k in own and v.shape != own[k].shape
        ]
        # FLUX.2's latent BatchNorm (bn.*) in one and not the other would be dropped or left at 0/1 silently.
        norm_differs = (weights.network.latent_batch_norm is None) != (self.network.latent_batch_norm is None)
        if wrong or norm_differs or weights.network.embed_dim != self.network.embed_dim:
            try:
                actual: Any = network_from_state_dict(weights.state_dict).ddconfig()  # what the shapes say
            except ValueError as e:
                actual = f"not inferable ({e})"
            raise ValueError(
                f"{path} holds a different network than model.params.ddconfig/embed_dim "
                f"({len(wrong)} shape mismatches, first: {wrong[:3]}; file embed_dim {weights.network.embed_dim}, "
                f"config {self.network.embed_dim}). The file's network is ddconfig={actual}. Set "
                "model.params.ddconfig to null to take the checkpoint's network, or fix it."
            )

    # ------------------------------------------------------------------ optimisation
    def _trainable_codec_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.decoder, self.post_quant_conv]
        if not self.train_decoder_only:
            modules = [self.encoder, self.quant_conv, *modules]
        params = [p for m in modules for p in m.parameters()]
        return params + self.loss.autoencoder_parameters()  # learned logvar, a VF projection, ...

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.learning_rate
        fused = self.optimizations.fused_adam_on(self.device)  # the model is on its device by now
        opt_ae = make_adam(self._trainable_codec_parameters(), self.lr_g_factor * lr, self.adam_betas, fused)
        opt_disc = make_adam(self.loss.discriminator.parameters(), lr, self.adam_betas, fused)
        for optimizer in (opt_ae, opt_disc):
            for group in optimizer.param_groups:  # the base of the schedule; saved with the optimizer state
                group.setdefault("initial_lr", group["lr"])
        return [opt_ae, opt_disc]

    def apply_lr_schedule(self) -> None:
        """Set both optimizers' lr for the coming iteration: ``initial_lr · lr_schedule.factor(iteration)``.

        Called from :meth:`on_train_start` (so a resumed run continues on its curve) and after every batch
        (:meth:`on_train_batch_end`, once ``training_step`` has advanced :attr:`iteration`).
        """
        if self.lr_schedule.is_constant:
            return
        factor = self.lr_schedule.factor(self._iteration)
        for optimizer in self.optimizers():
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def on_train_start(self) -> None:
        self.apply_lr_schedule()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.apply_lr_schedule()  # ThroughputMonitor logs the result as lr/ae and lr/disc

    def compile_regions(self) -> dict[str, torch.nn.Module]:
        """The modules ``optimizations.compile`` compiles, by name: encoder, decoder and the objective's
        networks (``lpips``, ``discriminator``, a loss term's backbone such as ``vf_backbone``)."""
        return {"encoder": self.encoder, "decoder": self.decoder, **self.loss.compile_regions()}

    def _check_region_names(self) -> None:
        regions = self.compile_regions()
        for field_name in ("compile_regions", "channels_last"):
            unknown = [n for n in getattr(self.optimizations, field_name) or () if n not in regions]
            if unknown:
                raise ConfigError(
                    f"model.params.optimizations.{field_name}: unknown region(s) {unknown}; this model has "
                    f"{sorted(regions)}"
                )

    def apply_optimizations(self, device: torch.device) -> AppliedOptimizations:
        """Compile regions, convert memory formats, set cudnn.benchmark for ``device`` (once per model)."""
        if self.applied_optimizations is None:
            self.applied_optimizations = apply_runtime_optimizations(
                self.compile_regions(), self.optimizations, device
            )
            log.info(
                "optimizations applied on %s: %s", device, self.applied_optimizations.descriptions or "none"
            )
        return self.applied_optimizations

    def graph_counts(self) -> dict[str, int]:
        """Graphs compiled so far per compiled region (what a run must keep small; empty when not compiled)."""
        return {} if self.applied_optimizations is None else self.applied_optimizations.graph_counts()

    def on_fit_start(self) -> None:
        # Here, not in __init__: compile/cudnn choices depend on the device the Trainer picked.
        self.apply_optimizations(self.device)

    def _phase(self, iteration: int) -> tuple[bool, bool]:
        """(update autoencoder, update discriminator) for this iteration."""
        gan_on = self.loss.disc_factor_at(iteration) > 0
        if not gan_on:
            return True, False
        if self.update_schedule == "every_batch":
            return True, True
        return iteration % 2 == 0, iteration % 2 == 1

    @property
    def at_round_boundary(self) -> bool:
        """No accumulation round is under way: every batch seen so far has been stepped (a safe point to save)."""
        return self._micro_step % self.accumulate_grad_batches == 0

    def _backward_and_step(self, optimizer: Any, loss: torch.Tensor, step: bool) -> None:
        self.manual_backward(loss / self.accumulate_grad_batches)
        # A non-finite loss marks this optimizer's own gradients (not the other optimizer's), so the skip
        # decision travels with them through the all-reduce and the accumulation round.
        self.nonfinite.poison_if_nonfinite(loss, optimizer.param_groups[0]["params"])
        if step:
            optimizer.step()  # clipping and the non-finite guard: on_before_optimizer_step
            vars(getattr(optimizer, "optimizer", optimizer)).pop("found_inf", None)
            optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale (16-mixed), then clip and guard the gradients of the optimizer about to step.

        Lightning calls this inside ``optimizer.step()``, after its own unscaling; it leaves unscaling to
        optimizers that do it themselves (fused Adam), so those are unscaled here: clipping must see the
        true gradients (a threshold divided by the loss scale otherwise).

        Non-finite guard (:mod:`klvae.models.nonfinite`): a non-finite gradient norm skips the update; a
        non-finite loss in any micro-batch has already made a gradient NaN (``_backward_and_step``), and the
        gradients are all-reduced before this hook, so every rank decides alike. With fused Adam the
        decision stays on the device (``found_inf``, the flag GradScaler uses: the fused kernel skips the
        update and the step count): no host sync. Other optimizers need it on the host (``.item()`` once
        per update; free on CPU), and their gradients are dropped so Adam skips every parameter. The
        streaks are checked on the host every ``max_nonfinite_in_a_row`` iterations (training_step).
        """
        scaler = self._grad_scaler()
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # fp32 device scalar
        if self.gradient_clip_val is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.gradient_clip_val, norm)
        index = next(i for i, o in enumerate(self.trainer.optimizers) if o is optimizer)
        bad = self.nonfinite.judge(index, norm)
        if optimizer.defaults.get("fused"):
            # Read by Adam.step. GradScaler (16-mixed) replaces it with its own check of the same
            # gradients, which holds the same NaN, so both skip the same updates.
            optimizer.found_inf = bad.float()
        elif bad.item():
            for p in params:
                p.grad = None

    def _reconstruct(self, x: torch.Tensor, branch: Branch, for_generator: bool) -> _Forward:
        """D(τ(z)), z ~ q(z|x); τ is the identity outside EQ-VAE's equivariance branch.

        Both networks return their last conv's input (the adaptive weights differentiate against those
        convs), in every training call, so a compiled region keeps one graph per grad mode. With adaptive
        latent terms the decoder runs from a detached copy of its input (:class:`LatentCut`).
        """
        frozen = torch.no_grad() if self.train_decoder_only else nullcontext()
        with frozen:  # a frozen encoder keeps no activations for backward
            h, h_in = self.encoder(x, return_last_input=True)  # (B, 2·z, h, w), conv_out's input
            posterior = DiagonalGaussianDistribution(self.quant_conv(h))
        z = posterior.sample()
        decoder_input = branch.latent(z)
        cut = None
        if for_generator and self.loss.needs_latent_cut:
            leaf = decoder_input.detach().requires_grad_(True)
            cut = LatentCut(decoder_input, leaf, LastLayer(self.encoder.conv_out, h_in, h))
        recon, recon_in = self.decoder(
            self.post_quant_conv(decoder_input if cut is None else cut.decoder_leaf), return_last_input=True
        )
        return _Forward(recon, posterior, z, LastLayer(self.decoder.conv_out, recon_in), cut)

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        plugin = self.trainer.precision_plugin
        return plugin.scaler if isinstance(plugin, MixedPrecision) else None

    def _loss_scale(self, device: torch.device) -> torch.Tensor | None:
        """The GradScaler's current scale as a device tensor under 16-mixed (no host sync), else None."""
        scaler = self._grad_scaler()
        return None if scaler is None else scaler.scale(torch.ones((), device=device))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # Lightning re-logs the last value of every step metric of this epoch on each later step, logged
        # again or not: in the alternate schedule every row would carry the other update's stale losses.
        # Dropping this hook's step results first makes a row hold exactly what this step computed.
        self.trainer._results.reset(metrics=False, fx="training_step")
        x = self.get_input(batch)  # (B, 3, H, W)
        # EQ-VAE: the batch's branch; x becomes the encoder's input, target the image x̂ is compared with.
        branch = Branch() if self.equivariance is None else self.equivariance.draw(self._micro_step)
        x = branch.encoder_input(x, self._downsample_factor)
        target = branch.target(x, self._downsample_factor)
        opt_ae, opt_disc = self.optimizers()
        it = self._iteration
        update_ae, update_disc = self._phase(it)
        last_micro = (self._micro_step + 1) % self.accumulate_grad_batches == 0
        logs: dict[str, torch.Tensor] = {}
        recon = None

        if update_ae:
            self.toggle_optimizer(
                opt_ae
            )  # discriminator params get requires_grad=False: g_loss cannot move D
            fwd = self._reconstruct(x, branch, for_generator=True)
            recon = fwd.reconstructions
            loss, logs_g = self.loss.generator_loss(
                target, recon, fwd.posterior, it, fwd.decoder_last_layer, "train",
                grad_scale=self._loss_scale(x.device), latents=fwd.latents, encoder_images=x,
                latent_cut=fwd.latent_cut,
            )  # fmt: skip
            self._backward_and_step(opt_ae, loss, last_micro)
            self.untoggle_optimizer(opt_ae)
            logs.update(logs_g)
        if update_disc:
            if recon is None:  # alternate schedule: this batch only needs x̂ as the discriminator's input
                with torch.no_grad():
                    recon = self._reconstruct(x, branch, for_generator=False).reconstructions
            self.toggle_optimizer(opt_disc)
            d_loss, logs_d = self.loss.discriminator_loss(target, recon, it, "train", self._disc_updates)
            self._backward_and_step(opt_disc, d_loss, last_micro)
            self.untoggle_optimizer(opt_disc)
            logs.update(logs_d)

        self._micro_step += 1
        if last_micro:
            self._iteration += 1
            self._disc_updates += int(update_disc)
            if update_ae and self.ema is not None:  # a skipped update leaves the average alone
                self.ema.update(self.codec_modules(), skipped=self.nonfinite.last_bad[0])
            if self._iteration % self.nonfinite.max_in_a_row == 0:
                self.nonfinite.check(self._iteration)
        # Device scalars only (torch.full is a fill kernel, not a host copy); nothing here waits for the
        # device. The loss is not on the progress bar: the bar calls .item() on every step.
        logs["train/iteration"] = torch.full((), float(self._iteration), device=x.device)
        logs["train/skipped_nonfinite"] = self.nonfinite.total_skipped().float()
        if self.equivariance is not None:  # 0 normal, 1 equivariance, 2 low-resolution prior preservation
            logs["train/eq_branch"] = torch.full((), float(branch.index), device=x.device)
        self.log_dict(
            self._with_unwritten(logs), on_step=True, on_epoch=False, logger=True, batch_size=x.shape[0]
        )

    def _with_unwritten(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This step's metrics plus the latest ones of earlier steps that no log row has held yet.

        Lightning writes a row every ``log_every_n_steps`` batches. In the alternate schedule an even
        cadence would only ever land on discriminator updates and the generator's losses would never be
        written; so a row also holds the other update's latest losses, if no row held them yet. Each value
        is written at most once (no stale copies: ``training_step`` drops the step results first).
        """
        every = self.trainer.log_every_n_steps
        # Lightning's cadence (LoggerConnector.should_update_logs), counted in batches as _micro_step is.
        written_now = bool(every) and self._micro_step % every == 0
        merged = {**self._unwritten_logs, **logs}
        self._unwritten_logs = {} if written_now else merged
        return merged

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)
        with self.ema_scope():
            posterior = self.encode(x)
            recon = self.decode(posterior.mode())  # the mode: a deterministic, comparable val/rec_loss
        _, logs_g = self.loss.generator_loss(
            x, recon, posterior, self._iteration, None, "val", latents=posterior.mode(), encoder_images=x
        )
        _, logs_d = self.loss.discriminator_loss(x, recon, self._iteration, "val")
        # Familiar units, scored as klvae-eval does (8-bit reconstructions); LPIPS with the loss's VGG-LPIPS
        # when it has one (perceptual_weight > 0), on the same images.
        scores = reconstruction_scores(x, recon, self.loss.perceptual_loss)
        metrics = {f"val/{name}": values.float().mean() for name, values in scores.items()}
        self.log_dict(
            {**logs_g, **logs_d, **metrics},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=x.shape[0],
        )

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8) -> dict[str, torch.Tensor]:  # noqa: N803 (LDM's name)
        """Inputs, reconstructions and decodes of N(0, I) latents, each (N, 3, H, W), roughly in [-1, 1].

        With kl_weight 1e-6 the latent distribution is far from N(0, I), so ``samples`` look like
        structured noise: that is expected, not a bug.
        """
        x = self.get_input(batch)[:N].to(self.device)
        # Eager: a few images at another batch size, in eval mode, would each compile a graph per region.
        with torch.compiler.set_stance("force_eager"), self.ema_scope():
            posterior = self.encode(x)
            recon = self.decode(posterior.sample())
            samples = self.decode(torch.randn_like(posterior.mean))
        return {"inputs": x, "reconstructions": recon, "samples": samples}

    def on_validation_start(self) -> None:
        # Validation (and the sanity check) run eager: eval mode, another batch size and no_grad would each
        # compile their own graph per region, for a few batches, and push regions towards the recompile
        # limit after which dynamo silently runs them eager in training too.
        torch.compiler.set_stance("force_eager")

    def on_validation_end(self) -> None:
        torch.compiler.set_stance("default")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["klvae"] = {
            "iteration": self._iteration,
            "micro_step": self._micro_step,
            "disc_updates": self._disc_updates,
            "nonfinite": self.nonfinite.counters(),  # the run's skip counts, not one launch's
            "format": 1,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("klvae", {})
        self._iteration = int(state.get("iteration", 0))
        self._micro_step = int(state.get("micro_step", 0))
        self._disc_updates = int(state.get("disc_updates", 0))
        if "nonfinite" in state:
            self.nonfinite.load_counters(state["nonfinite"])
