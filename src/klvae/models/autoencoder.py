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
from typing import Any

import pytorch_lightning as pl
import torch

from klvae.ema import ModuleEMA
from klvae.loading import VAEWeights, read_vae_weights
from klvae.lr_schedule import LRSchedule
from klvae.metrics import reconstruction_scores
from klvae.modules.vae import KLCodec, build_codec_modules
from klvae.perf.apply import apply_runtime_optimizations, make_adam
from klvae.perf.options import parse_optimizations
from klvae.state_dict import NETWORK_PREFIXES, read_state_dict, select_first_stage
from klvae.util import instantiate_from_config, to_container

__all__ = ["AutoencoderKL"]

log = logging.getLogger(__name__)

_SCHEDULES = ("alternate", "every_batch")


class AutoencoderKL(KLCodec, pl.LightningModule):
    """KL-regularised autoencoder (LDM's ``first_stage_model``) with its GAN training recipe.

    State-dict keys match LDM's (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
    ``loss.*``), plus ``ema.*`` when EMA is on.

    Args:
        ddconfig: network config in LDM's vocabulary (see :class:`klvae.modules.model.Encoder`); None
            reads it from ``ckpt_path`` (fine-tunes: the network is whatever the checkpoint holds).
        lossconfig: ``{target, params}`` of the loss, normally
            :class:`klvae.modules.losses.LPIPSWithDiscriminator`.
        embed_dim: posterior channels (4).
        learning_rate: discriminator lr; the CLI overwrites it with the ``--scale_lr`` result.
        lr_g_factor: autoencoder lr = ``lr_g_factor · learning_rate``.
        adam_betas: Adam betas of both optimizers.
        update_schedule: ``"alternate"`` (seed: after disc_start even iterations update the autoencoder,
            odd ones the discriminator) or ``"every_batch"`` (LDM: one forward, both updates).
        accumulate_grad_batches: batches per update round (Lightning cannot do this in manual mode).
        gradient_clip_val: clip each optimizer's gradient norm to this value (None: off).
        ema_decay: keep an EMA of the autoencoder weights, used for validation, images and export.
        train_decoder_only: freeze encoder and quant_conv (the sd-vae-ft recipe).
        ckpt_path: warm start from an LDM/SD/klvae checkpoint, a klvae export or diffusers weights
            (``first_stage_model.`` prefix handled). A given ``ddconfig`` is checked against it.
        ckpt_use_ema: for a klvae run checkpoint with EMA weights: None (default) starts from its EMA
            weights (what ``klvae-export`` wrote), False from its live weights, True requires EMA weights.
        ignore_keys: key prefixes to drop from ``ckpt_path`` (e.g. ``["loss.discriminator"]``).
        image_key: batch key of the images, (B, 3, H, W) float in [-1, 1].
        monitor: metric for best-checkpoint selection.
        lr_schedule: learning-rate warm-up and decay for both optimizers, counted in iterations, e.g.
            ``{warmup_iterations: 1000, decay: cosine, total_iterations: 250000}``; keys in
            :class:`klvae.lr_schedule.LRSchedule`. None: constant (LDM).
        optimizations: speed/memory switches (torch.compile, fused Adam, channels_last, LPIPS target
            without autograd, gradient checkpointing, cudnn.benchmark); keys and defaults in
            :class:`klvae.perf.options.Optimizations`, an unknown key is a ``ValueError``.
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
        image_key: str = "image",
        monitor: str | None = "val/rec_loss",
        optimizations: Mapping[str, Any] | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if update_schedule not in _SCHEDULES:
            raise ValueError(f"update_schedule must be one of {_SCHEDULES}, got {update_schedule!r}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(
                f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches!r}"
            )
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val!r}")
        if len(adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {adam_betas!r}")
        lossconfig = to_container(lossconfig)
        self.lr_schedule = LRSchedule.from_config(to_container(lr_schedule))
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
            ddconfig = warm_start.ddconfig
            log.info("network read from %s: ddconfig=%s", ckpt_path, ddconfig)
        ddconfig = to_container(ddconfig)
        opts = None if optimizations is None else to_container(optimizations)
        self.optimizations = parse_optimizations(opts)
        # Plain containers only: a DictConfig in hparams would break torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "ddconfig": ddconfig,
                "lossconfig": lossconfig,
                "embed_dim": embed_dim,
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
                "lr_schedule": to_container(lr_schedule),
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
        self.embed_dim = embed_dim

        for name, module in build_codec_modules(ddconfig, embed_dim).items():
            self.add_module(name, module)
        self.loss = instantiate_from_config(lossconfig)
        if self.optimizations.gradient_checkpointing:
            self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True
        if hasattr(self.loss, "lpips_target_no_grad"):
            self.loss.lpips_target_no_grad = self.optimizations.lpips_target_no_grad
        self._runtime_optimized = False
        self.ema = ModuleEMA(self._codec_modules(), decay=ema_decay) if ema_decay is not None else None
        if warm_start is not None:
            self.init_from_ckpt(str(ckpt_path), ignore_keys, warm_start)
        if train_decoder_only:
            self.encoder.requires_grad_(False)
            self.quant_conv.requires_grad_(False)

        # Training progress in iterations; saved in checkpoint["klvae"] (plain ints, weights_only-safe).
        self._iteration = 0
        self._micro_step = 0

    # ------------------------------------------------------------------ basics
    @property
    def iteration(self) -> int:
        """Completed training iterations (update rounds), the clock of disc_start and all cadences."""
        return self._iteration

    def _codec_modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in ("encoder", "decoder", "quant_conv", "post_quant_conv")}

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.image_key not in batch:
            raise KeyError(
                f"batch has no key {self.image_key!r} (keys: {sorted(batch)}); set model.params.image_key"
            )
        x = batch[self.image_key]
        if x.dim() != 4 or x.shape[1] != self.encoder.conv_in.in_channels:
            raise ValueError(
                f"batch[{self.image_key!r}] must be (B, {self.encoder.conv_in.in_channels}, H, W) float in [-1, 1], "
                f"got shape {tuple(x.shape)} (BHWC data must be permuted to BCHW)"
            )
        return x.float()

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """Inside the block the network runs with EMA weights (no-op without EMA)."""
        with self.ema.swapped(self._codec_modules()) if self.ema is not None else nullcontext():
            yield

    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), weights: VAEWeights | None = None
    ) -> None:
        """Warm start from an LDM/SD/klvae checkpoint; every network tensor must be present and fit.

        The network comes from :func:`klvae.loading.read_vae_weights` (``weights`` when the caller has
        read it already; a klvae run's EMA weights when it has them, see ``ckpt_use_ema``); ``loss.*``
        tensors (LDM's discriminator and logvar) from the file itself. The EMA, when on, starts from the
        loaded weights: a fine-tune averages from where it starts.
        """
        weights = weights if weights is not None else read_vae_weights(path)
        ignore = tuple(ignore_keys)
        network = {k: v for k, v in weights.state_dict.items() if not (ignore and k.startswith(ignore))}
        self._check_network_fits(path, weights, network)
        loss_state = {}
        if weights.source_format != "diffusers":
            raw = select_first_stage(read_state_dict(path), ignore)
            loss_state = {k: v for k, v in raw.items() if k.startswith("loss.")}
        missing, unexpected = self.load_state_dict({**network, **loss_state}, strict=False)
        missing_net = [k for k in missing if k.startswith(NETWORK_PREFIXES)]
        if missing_net:
            raise ValueError(
                f"{path} lacks {len(missing_net)} autoencoder tensors (first: {missing_net[:5]}); it is not an "
                "LDM/SD kl-f8 checkpoint for this ddconfig"
            )
        if self.ema is not None:
            self.ema.copy_from(self._codec_modules())
        log.info(
            "warm start from %s (%s%s): %d tensors loaded; not in file: %s; ignored from file: %s",
            path,
            weights.source_format,
            ", EMA weights" if weights.used_ema else "",
            len(network) + len(loss_state) - len(unexpected),
            sorted({".".join(k.split(".")[:2]) for k in missing if not k.startswith("ema.")}) or "none",
            unexpected[:10] or "none",
        )

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
        if wrong or weights.embed_dim != self.embed_dim:
            try:
                actual: Any = read_vae_weights(path).ddconfig  # what the file's shapes say
            except ValueError as e:
                actual = f"not inferable ({e})"
            raise ValueError(
                f"{path} holds a different network than model.params.ddconfig/embed_dim "
                f"({len(wrong)} shape mismatches, first: {wrong[:3]}; file embed_dim {weights.embed_dim}, "
                f"config {self.embed_dim}). The file's network is ddconfig={actual}. Set "
                "model.params.ddconfig to null to take the checkpoint's network, or fix it."
            )

    # ------------------------------------------------------------------ optimisation
    def _trainable_codec_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.decoder, self.post_quant_conv]
        if not self.train_decoder_only:
            modules = [self.encoder, self.quant_conv, *modules]
        params = [p for m in modules for p in m.parameters()]
        if self.loss.learn_logvar:
            params.append(self.loss.logvar)
        return params

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

    def on_fit_start(self) -> None:
        # Here, not in __init__: compile/cudnn choices depend on the device the Trainer picked.
        if not self._runtime_optimized:
            applied = apply_runtime_optimizations(self, self.optimizations, self.device)
            self._runtime_optimized = True
            log.info("optimizations applied on %s: %s", self.device, applied or "none")

    def _phase(self, iteration: int) -> tuple[bool, bool]:
        """(update autoencoder, update discriminator) for this iteration."""
        gan_on = self.loss.disc_factor_at(iteration) > 0
        if not gan_on:
            return True, False
        if self.update_schedule == "every_batch":
            return True, True
        return iteration % 2 == 0, iteration % 2 == 1

    def _backward_and_step(self, optimizer: Any, loss: torch.Tensor, step: bool) -> None:
        self.manual_backward(loss / self.accumulate_grad_batches)
        if step:
            if self.gradient_clip_val is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.train_decoder_only:
            with torch.no_grad():  # frozen encoder: no activations kept for backward
                posterior = self.encode(x)
            return self.decode(posterior.sample()), posterior
        return self(x)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)  # (B, 3, H, W)
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
            recon, posterior = self._reconstruct(x)
            loss, logs_g = self.loss.generator_loss(x, recon, posterior, it, self.get_last_layer(), "train")
            self._backward_and_step(opt_ae, loss, last_micro)
            self.untoggle_optimizer(opt_ae)
            logs.update(logs_g)
        if update_disc:
            if recon is None:  # alternate schedule: this batch only needs x̂ as the discriminator's input
                with torch.no_grad():
                    recon, _ = self._reconstruct(x)
            self.toggle_optimizer(opt_disc)
            d_loss, logs_d = self.loss.discriminator_loss(x, recon, it, "train")
            self._backward_and_step(opt_disc, d_loss, last_micro)
            self.untoggle_optimizer(opt_disc)
            logs.update(logs_d)

        self._micro_step += 1
        if last_micro:
            self._iteration += 1
            if update_ae and self.ema is not None:
                self.ema.update(self._codec_modules())
        logs["train/iteration"] = torch.tensor(float(self._iteration))
        self.log_dict(logs, on_step=True, on_epoch=False, logger=True, batch_size=x.shape[0])
        if "train/total_loss" in logs:
            self.log(
                "train/loss", logs["train/total_loss"], prog_bar=True, logger=False, batch_size=x.shape[0]
            )

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)
        with self.ema_scope():
            posterior = self.encode(x)
            recon = self.decode(posterior.mode())  # the mode: a deterministic, comparable val/rec_loss
        _, logs_g = self.loss.generator_loss(x, recon, posterior, self._iteration, None, "val")
        _, logs_d = self.loss.discriminator_loss(x, recon, self._iteration, "val")
        # Familiar units, scored as klvae-eval does (8-bit reconstructions); LPIPS with the loss's VGG-LPIPS
        # when it has one (perceptual_weight > 0), on the same images.
        lpips_model = getattr(self.loss, "perceptual_loss", None)
        scores = reconstruction_scores(x, recon, lpips_model)
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
        with self.ema_scope():
            posterior = self.encode(x)
            recon = self.decode(posterior.sample())
            samples = self.decode(torch.randn_like(posterior.mean))
        return {"inputs": x, "reconstructions": recon, "samples": samples}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["klvae"] = {"iteration": self._iteration, "micro_step": self._micro_step, "format": 1}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("klvae", {})
        self._iteration = int(state.get("iteration", 0))
        self._micro_step = int(state.get("micro_step", 0))
