"""The non-finite guard (klvae.models.nonfinite) in real training: a fault in one optimizer only, in one
micro-batch of an accumulation round, under a real GradScaler with fused and plain Adam; EMA and the stop rule."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from klvae.models.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from tests.models.faults import FaultyAutoencoderKL, inject
from tests.models.test_autoencoder import MovedParameters

AE = {"encoder", "quant_conv", "decoder"}


def make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=2, **params) -> FaultyAutoencoderKL:
    tiny_lossconfig["params"]["disc_start"] = disc_start
    params.setdefault("learning_rate", 1e-3)
    return FaultyAutoencoderKL(faults=faults, ddconfig=tiny_ddconfig, lossconfig=tiny_lossconfig, embed_dim=4,
                               **params)  # fmt: skip


def fit(model, batches: int, callbacks=(), precision: str = "32-true") -> pl.Trainer:
    kwargs: dict = {"precision": precision}
    if precision == "16-mixed":  # a real GradScaler (Lightning maps 16-mixed to bf16 on CPU otherwise)
        kwargs = {
            "plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=16.0))]
        }
    data = [
        {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        for i in range(batches)
    ]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    return trainer


def adam_steps(optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


class Snapshots(pl.Callback):
    """State dict (weights, EMA) and both optimizers' states after every batch."""

    def __init__(self) -> None:
        self.after: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(
            {
                "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "steps": [adam_steps(o) for o in trainer.optimizers],
            }
        )


@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_stop_rule_fires_when_only_the_autoencoder_keeps_failing(tiny_ddconfig, tiny_lossconfig, schedule):
    # NaN gradients in every autoencoder update from iteration 3; the discriminator stays healthy and keeps
    # training in between. One streak for both optimizers never reached 3 (a healthy D step reset it).
    faults = [{"optimizer": "ae", "kind": "grad", "iterations": list(range(3, 100))}]
    model = make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=1, update_schedule=schedule,
                 max_nonfinite_in_a_row=3)  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"3 autoencoder updates in a row"):
        fit(model, 30)
    opt_ae, opt_disc = (o.optimizer for o in model.optimizers())
    # The autoencoder stepped before iteration 3 only: at 0 and 2 (alternate: D on odd iterations), or
    # at 0, 1 and 2 (every_batch).
    assert adam_steps(opt_ae) == ({2} if schedule == "alternate" else {3})
    assert int(model.nonfinite.skipped[1]) == 0 and adam_steps(opt_disc) != set()
    # Stopped at the first check after the third bad autoencoder update: alternate updates the
    # autoencoder on even iterations only (4, 6, 8: checked at 9), every_batch on every one (3, 4, 5: at 6).
    assert model.iteration == (9 if schedule == "alternate" else 6)


@pytest.mark.parametrize(
    "precision,fused",
    [("32-true", False), ("32-true", True), ("16-mixed", False), ("16-mixed", True), ("bf16-mixed", True)],
)
def test_nan_loss_with_finite_gradients_skips_exactly_that_update(tiny_ddconfig, tiny_lossconfig, precision,
                                                                  fused):  # fmt: skip
    # The value of the autoencoder loss is NaN at iteration 1, its gradients are finite (as with the
    # adaptive weight's detached value). Under 16-mixed with fused Adam the GradScaler writes its own
    # found_inf into the optimizer: it must skip too, not step an update the guard counts as skipped.
    faults = [{"optimizer": "ae", "kind": "loss", "iterations": [1]}]
    model = make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=100, ema_decay=0.9,
                 optimizations={"fused_adam": fused})  # fmt: skip
    snaps, moved = Snapshots(), MovedParameters()
    fit(model, 3, [snaps, moved], precision)
    assert model.injected == [("ae", 1, 0)]
    assert moved.moved[1] == set()  # weights did not move ...
    before, after = snaps.after[0]["weights"], snaps.after[1]["weights"]
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped update changed the state"
    assert snaps.after[1]["steps"][0] == {1}  # ... nor Adam's state and step count ...
    assert moved.moved[2] == AE and snaps.after[2]["steps"][0] == {2}  # ... and training goes on
    assert model.nonfinite.skipped.tolist() == [1, 0]


def test_ema_ignores_skipped_updates(tiny_ddconfig, tiny_lossconfig):
    faults = [{"optimizer": "ae", "kind": "grad", "iterations": [1]}]
    model = make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=100, ema_decay=0.9)
    snaps = Snapshots()
    fit(model, 3, [snaps])
    ema = [{k: v for k, v in s["weights"].items() if k.startswith("ema.")} for s in snaps.after]
    assert (
        ema[0]["ema.num_updates"] == 1 and ema[1]["ema.num_updates"] == 1 and ema[2]["ema.num_updates"] == 2
    )
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])  # the shadow did not move
    assert any(not torch.equal(ema[1][k], ema[2][k]) for k in ema[1] if k != "ema.num_updates")


def test_ema_update_matches_litema_warmup_on_the_device(tiny_ddconfig, tiny_lossconfig):
    model = make(tiny_ddconfig, tiny_lossconfig, [], disc_start=100, ema_decay=0.9)
    live = model.codec_modules()
    shadow_before = model.ema.decoder.conv_out.weight.clone()
    with torch.no_grad():
        model.decoder.conv_out.weight.add_(1.0)
    model.ema.update(live)  # the first update: LitEma's decay min(0.9, 2/11)
    expected = torch.lerp(shadow_before, model.decoder.conv_out.weight, 1 - 2 / 11)
    torch.testing.assert_close(model.ema.decoder.conv_out.weight, expected, rtol=0, atol=1e-6)
    model.ema.update(live, skipped=torch.tensor(True))
    assert int(model.ema.num_updates) == 1
    torch.testing.assert_close(model.ema.decoder.conv_out.weight, expected, rtol=0, atol=0)


def test_every_batch_accumulation_keeps_each_optimizers_fault_to_itself(tiny_ddconfig, tiny_lossconfig):
    # every_batch, 2 micro-batches per round: a NaN discriminator loss in the first micro-batch of round 2
    # skips the discriminator update that contains it, and only that one.
    faults = [{"optimizer": "disc", "kind": "loss", "iterations": [2], "micro": [0]}]
    model = make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=1, update_schedule="every_batch",
                 accumulate_grad_batches=2)  # fmt: skip
    moved = MovedParameters()
    fit(model, 8, [moved])
    assert model.injected == [("disc", 2, 0)]
    # Rounds (batches): 0 (0, 1) pre-GAN, 1 (2, 3), 2 (4, 5) with the fault, 3 (6, 7).
    assert moved.moved[5] == AE  # the autoencoder stepped; the discriminator did not
    assert moved.moved[3] == moved.moved[7] == AE | {"discriminator"}
    assert model.nonfinite.skipped.tolist() == [0, 1]


@pytest.mark.parametrize("fused", [False, True])
def test_nan_in_one_micro_batch_skips_the_whole_round(tiny_ddconfig, tiny_lossconfig, fused):
    faults = [{"optimizer": "ae", "kind": "loss", "iterations": [1], "micro": [0]}]
    model = make(tiny_ddconfig, tiny_lossconfig, faults, disc_start=100, accumulate_grad_batches=2,
                 optimizations={"fused_adam": fused})  # fmt: skip
    moved = MovedParameters()
    fit(model, 6, [moved])
    assert [bool(m) for m in moved.moved] == [False, True, False, False, False, True]
    assert model.nonfinite.skipped.tolist() == [1, 0]


def test_guard_counts_per_optimizer_and_round_trips_through_a_checkpoint():
    guard = NonFiniteGuard(("autoencoder", "discriminator"), max_in_a_row=2)
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    for index, norm in [(0, nan), (1, ok), (0, nan), (1, ok)]:
        guard.judge(index, norm)
    assert guard.counters() == {"skipped": [2, 0], "streak": [2, 0], "worst": [2, 0]}
    with pytest.raises(NonFiniteTrainingError, match="2 autoencoder updates in a row"):
        guard.check(iteration=4)
    restored = NonFiniteGuard(("autoencoder", "discriminator"), max_in_a_row=5)
    restored.load_counters(guard.counters())
    assert restored.counters() == guard.counters() and int(restored.total_skipped()) == 2


def test_poisoning_marks_only_non_finite_losses():
    p = torch.nn.Parameter(torch.ones(3))
    (p * 2).sum().backward()
    NonFiniteGuard.poison_if_nonfinite(torch.tensor(1.0), [p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))  # a finite loss leaves the gradient bitwise alone
    NonFiniteGuard.poison_if_nonfinite(inject(torch.tensor(1.0), "loss"), [p])
    assert p.grad[0].isnan() and torch.equal(p.grad[1:], torch.full((2,), 2.0))


def test_max_nonfinite_in_a_row_is_validated():
    with pytest.raises(ValueError, match="max_nonfinite_in_a_row must be an integer >= 1, got 0"):
        NonFiniteGuard(("a",), 0)
