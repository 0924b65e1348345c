"""Train the protocol's DiT on one latent directory, with a fixed-σ validation loss curve; resumable.

The loop is plain PyTorch (one process, one device): AdamW with linear warm-up, gradient clipping, an EMA
of the weights (``klvae.models.ema.ModuleEMA``), bf16 autocast and ``torch.compile`` on GPU. Every
``checkpoint_every`` steps ``dit.ckpt`` is written atomically (never with non-finite weights); a re-run
continues from it exactly: the data order is a function of (seed, epoch) and the loader skips the batches
of the current epoch already trained on (``klvae.data.resume``), the noise generator and torch's RNG are
restored.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from klvae.data.latent_shards import LatentShardDataset
from klvae.data.resume import ResumableSampler
from klvae.diffusability.flow import build_dit, flow_loss, null_labels, validation_loss
from klvae.diffusability.protocol import DiTProtocol
from klvae.errors import ConfigError, DataError, TrainingDivergedError
from klvae.io.files import load_torch_file, torch_save_to, write_atomically
from klvae.models.ema import ModuleEMA

__all__ = ["CHECKPOINT_NAME", "TrainedDiT", "train_dit"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "dit.ckpt"


@dataclass
class TrainedDiT:
    """The trained model (EMA weights loaded), its curve and bookkeeping.

    Attributes:
        model: the DiT with EMA weights, eval mode, on the device.
        num_classes: None for unconditional.
        curve: ``[{"step", "loss": mean over σ, "per_sigma": {σ: loss}}]`` of the live weights.
        ema_val_loss: the final validation loss of the EMA weights.
        train_loss: mean training loss of the last ``val_every`` steps.
        val_source: ``held-out`` or ``training latents`` (too few images to hold any out).
        seconds: training wall time (this and earlier runs).
        resumed_from: the step a checkpoint was resumed at, else None.
    """

    model: torch.nn.Module
    num_classes: int | None
    curve: list[dict[str, Any]] = field(default_factory=list)
    ema_val_loss: float = math.nan
    train_loss: float = math.nan
    val_source: str = "held-out"
    seconds: float = 0.0
    resumed_from: int | None = None


def _val_tensors(
    latent_dir: Path, protocol: DiTProtocol, has_labels: bool
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Held-out latents (posterior means, no flips) and labels; the training latents when none are held out."""
    source = "held-out"
    try:
        if protocol.val_fraction <= 0:
            raise DataError("no validation split")
        data = LatentShardDataset(latent_dir, "val", protocol.val_fraction, False, False, protocol.latent_norm,
                                  protocol.seed)  # fmt: skip
    except DataError:
        data = LatentShardDataset(latent_dir, "all", 0.0, False, False, protocol.latent_norm, protocol.seed)
        source = "training latents"
        log.warning("%s: no held-out latents (val_fraction %s): the validation loss uses training latents",
                    latent_dir, protocol.val_fraction)  # fmt: skip
    items = [data[i] for i in range(min(len(data), protocol.val_max_latents))]
    x = torch.stack([it["latent"] for it in items])  # (N, C, h, w)
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return x, labels if has_labels else torch.full_like(labels, -1), source


def _lr(protocol: DiTProtocol, step: int) -> float:
    return protocol.lr * min(1.0, (step + 1) / max(1, protocol.warmup_steps))


def train_dit(
    latent_dir: str | Path,
    protocol: DiTProtocol,
    work_dir: str | Path,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool | str = False,
    num_workers: int = 0,
    progress: bool = True,
) -> TrainedDiT:
    """Train (or resume, or just load when finished) the DiT of ``protocol`` on ``latent_dir``.

    Args:
        latent_dir: a ``klvae-encode`` directory.
        protocol: the fixed protocol.
        work_dir: where ``dit.ckpt`` lives.
        device: training device.
        precision: ``fp32`` or ``bf16`` (autocast; weights and optimizer state stay fp32).
        compile: ``torch.compile`` the DiT for training (True: inductor; a string names another backend,
            e.g. ``"aot_eager"``).
        num_workers: latent-reading DataLoader workers.
        progress: tqdm bar.

    Raises:
        ConfigError: a checkpoint in ``work_dir`` made with another protocol.
        TrainingDivergedError: a non-finite loss.
    """
    from tqdm import tqdm

    device, work_dir, latent_dir = torch.device(device), Path(work_dir), Path(latent_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    split = "train" if protocol.val_fraction > 0 else "all"
    data = LatentShardDataset(
        latent_dir, split, protocol.val_fraction, True, True, protocol.latent_norm, protocol.seed
    )
    if len(data) < protocol.batch_size:
        raise DataError(f"{latent_dir}: {len(data)} training latents, fewer than the batch size "
                        f"{protocol.batch_size}; encode more images or lower --batch-size")  # fmt: skip
    classes = data.index.classes
    num_classes = len(classes) if classes else None
    val_x, val_labels, val_source = _val_tensors(latent_dir, protocol, num_classes is not None)
    val_noise = torch.randn(val_x.shape, generator=torch.Generator().manual_seed(protocol.seed + 1))

    torch.manual_seed(protocol.seed)  # weight init and diffusers' label dropout draw from the global RNG
    model = build_dit(protocol, data.index.latent_shape, num_classes).to(device)
    ema = ModuleEMA({"dit": model}, protocol.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay)
    generator = torch.Generator(device).manual_seed(protocol.seed)
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "curve": [], "seconds": 0.0, "losses": []}
    ckpt_path = work_dir / CHECKPOINT_NAME
    resumed_from = None
    if ckpt_path.is_file():
        ckpt = load_torch_file(ckpt_path)
        if ckpt["protocol"] != protocol.to_dict():
            diff = sorted(k for k, v in protocol.to_dict().items() if ckpt["protocol"].get(k) != v)
            raise ConfigError(f"{ckpt_path} was trained with another protocol ({diff[0]}: "
                              f"{ckpt['protocol'].get(diff[0])!r}); use a new --out or the same settings")  # fmt: skip
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {k: ckpt[k] for k in state}
        resumed_from = state["step"]
        log.info("resuming %s at step %d of %d", ckpt_path, state["step"], protocol.steps)

    def save() -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDivergedError(f"non-finite DiT weights at step {state['step']}; not saved")
        ckpt = {"protocol": protocol.to_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                **state}  # fmt: skip
        write_atomically(ckpt_path, lambda tmp: torch_save_to(ckpt, tmp))

    labels_fn = (
        (lambda b: b["label"].to(device))
        if num_classes
        else (lambda b: null_labels(model, b["latent"].shape[0], device))
    )  # noqa: E731
    val_labels_dev = val_labels.to(device) if num_classes else null_labels(model, val_x.shape[0], device)
    if compile:
        trainable = torch.compile(model, backend=compile if isinstance(compile, str) else "inductor")
    else:
        trainable = model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def validate() -> dict[float, float]:
        model.eval()
        with autocast:
            losses = validation_loss(model, val_x.to(device), val_labels_dev, val_noise.to(device),
                                     protocol.val_sigmas, protocol.batch_size)  # fmt: skip
        model.train()
        return losses

    sampler = ResumableSampler(data, 0, 1, True, protocol.seed, drop_last=True)
    loader = DataLoader(data, batch_size=protocol.batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)  # fmt: skip
    bar = tqdm(total=protocol.steps, initial=state["step"], unit="step", desc=f"DiT {latent_dir.name}",
               disable=not progress)  # fmt: skip
    model.train()
    start = time.perf_counter()
    while state["step"] < protocol.steps:
        sampler.set_epoch(state["epoch"])
        sampler.skip = state["batches_in_epoch"] * protocol.batch_size
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = _lr(protocol, state["step"])
            x = batch["latent"].to(device, non_blocking=True)  # (B, C, h, w), normalised
            with autocast:
                loss = flow_loss(trainable, x, labels_fn(batch), generator)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"non-finite DiT loss at step {state['step']}: lower the learning "
                                            f"rate (now {protocol.lr})")  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if protocol.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), protocol.grad_clip)
            opt.step()
            ema.update({"dit": model})
            state["step"] += 1
            state["batches_in_epoch"] += 1
            state["losses"] = [*state["losses"][-(protocol.val_every - 1):], float(loss.detach())]  # fmt: skip
            bar.update(1)
            if state["step"] % protocol.val_every == 0 or state["step"] == protocol.steps:
                per_sigma = validate()
                state["curve"].append({"step": state["step"], "loss": sum(per_sigma.values()) / len(per_sigma),
                                       "per_sigma": per_sigma,
                                       "train_loss": sum(state["losses"]) / len(state["losses"])})  # fmt: skip
                bar.set_postfix(val=f"{state['curve'][-1]['loss']:.4f}")
            if state["step"] % protocol.checkpoint_every == 0 or state["step"] == protocol.steps:
                state["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                save()
            if state["step"] >= protocol.steps:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    bar.close()
    state["seconds"] += time.perf_counter() - start
    with ema.swapped({"dit": model}):
        ema_losses = validate()
    ema_state = {n[len("dit.") :]: t for n, t in ema.state_dict().items() if n.startswith("dit.")}
    model.load_state_dict(ema_state)  # sampling uses the EMA weights
    model.eval().requires_grad_(False)
    return TrainedDiT(model, num_classes, state["curve"], sum(ema_losses.values()) / len(ema_losses),
                      state["curve"][-1]["train_loss"] if state["curve"] else math.nan, val_source,
                      state["seconds"], resumed_from)  # fmt: skip
