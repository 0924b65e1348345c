"""The optimizer side of the training step: clipping after unscaling (every precision, real GradScaler)
and the non-finite guard (skip, count, stop)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from klvae.models.autoencoder import AutoencoderKL, NonFiniteTrainingError
from tests.models.test_autoencoder import MovedParameters, make_model


def fit(model: AutoencoderKL, data: list[dict], callbacks=(), precision: str = "32-true") -> pl.Trainer:
    kwargs = {"precision": precision}
    if (
        precision == "16-mixed"
    ):  # Lightning maps 16-mixed to bf16 on CPU; its plugin with a real scaler does not
        kwargs = {
            "plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=16.0))]
        }
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    return trainer


def images(n: int) -> list[dict]:
    return [
        {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        for i in range(n)
    ]


class StepNorms(pl.Callback):
    """Gradient norm each optimizer steps with (a post-step hook: clipping runs inside step())."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, module) -> None:
        def record(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(torch.nn.utils.get_total_norm(grads).item())

        for opt in trainer.optimizers:
            opt.register_step_post_hook(record)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("fused", [False, True])
def test_clipping_applies_to_unscaled_gradients(tiny_ddconfig, tiny_lossconfig, precision, fused):
    clip = 1e-3
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=1, gradient_clip_val=clip,
                       optimizations={"fused_adam": fused})  # fmt: skip
    norms = StepNorms()
    trainer = fit(model, images(3), [norms], precision)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    if scaler is not None:
        assert scaler.get_scale() >= 8.0  # a real loss scale was in play (8 or more)
    # The optimizer saw exactly the clip norm: clipping the scaled gradients would leave clip / scale.
    assert len(norms.norms) >= 3 and all(clip * (1 - 1e-3) <= n <= clip * (1 + 1e-3) for n in norms.norms), (
        norms.norms
    )


class PoisonBatches(pl.Callback):
    def __init__(self, batches: set[int]) -> None:
        self.batches = batches

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx in self.batches:
            batch["image"][0, 0, 0, 0] = float("nan")


class Skipped(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append(trainer.callback_metrics["train/skipped_nonfinite"].item())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_update_is_skipped_counted_and_logged(tiny_ddconfig, tiny_lossconfig, fused):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=2, update_schedule="every_batch",
                       optimizations={"fused_adam": fused})  # fmt: skip
    moved, skipped = MovedParameters(), Skipped()
    fit(model, images(4), [PoisonBatches({1, 3}), moved, skipped])
    ae = {"encoder", "quant_conv", "decoder"}
    # batch 3: the autoencoder update is non-finite and skipped; D's inputs are NaN too, so D is skipped.
    assert moved.moved == [ae, set(), ae | {"discriminator"}, set()]
    assert skipped.rows == [0.0, 1.0, 1.0, 3.0]
    opt_ae, opt_disc = model.optimizers()
    steps = {int(s["step"]) for s in opt_ae.optimizer.state.values()}
    assert steps == {2}  # Adam's step count did not advance on the skipped updates
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_updates_in_a_row_stop_the_run(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, max_nonfinite_in_a_row=3)
    with pytest.raises(
        NonFiniteTrainingError, match=r"3 autoencoder updates in a row.*iteration 3.*learning_rate"
    ):
        fit(model, images(6), [PoisonBatches(set(range(6)))])
    assert model.iteration == 3


class HostSyncCounter(TorchDispatchMode):
    """Ops that copy a device value to the host (``.item()``, ``bool(t)``, ``int(t)``: the host waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_training_step_and_its_logging_never_read_device_values(tiny_ddconfig, tiny_lossconfig, schedule):
    """On CPU a host read costs nothing, on a GPU it waits for the device: the step must make none (with
    fused Adam, the CUDA default; EMA reads its counter once, at the first update)."""
    counters: list[HostSyncCounter] = []

    class Watched(AutoencoderKL):
        def training_step(self, batch, batch_idx):
            if batch_idx < 1:
                return super().training_step(batch, batch_idx)
            with HostSyncCounter() as counter:
                super().training_step(batch, batch_idx)
            counters.append(counter)

    tiny_lossconfig["params"]["disc_start"] = 2
    model = Watched(tiny_ddconfig, tiny_lossconfig, embed_dim=4, learning_rate=1e-3, update_schedule=schedule,
                    ema_decay=0.9, gradient_clip_val=1.0, optimizations={"fused_adam": True})  # fmt: skip
    fit(model, images(5))
    assert len(counters) == 4 and model.loss.disc_factor_at(model.iteration - 1) > 0
    assert [c.calls for c in counters] == [[]] * 4


def test_accumulation_across_disc_start_steps_every_k_batches(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=1, update_schedule="every_batch",
                       accumulate_grad_batches=2, ema_decay=0.9)  # fmt: skip
    moved = MovedParameters()
    fit(model, images(4), [moved])
    ae = {"encoder", "quant_conv", "decoder"}
    assert moved.moved == [set(), ae, set(), ae | {"discriminator"}]
    assert model.iteration == 2 and int(model.nonfinite.total_skipped()) == 0
