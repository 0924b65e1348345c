"""AutoencoderKL: learning-rate schedule in iterations, honest decoder-only fine-tunes, validation metrics."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL
from klvae.models.lr_schedule import LRSchedule
from tests.models.test_autoencoder import fit, make_model


# ------------------------------------------------------------------ schedule
def test_schedule_factor_warmup_then_cosine_to_min():
    s = LRSchedule(warmup_iterations=4, decay="cosine", total_iterations=14, min_factor=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == pytest.approx(1.0)
    assert s.factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s.factor(14) == pytest.approx(0.1) and s.factor(1000) == pytest.approx(0.1)


def test_schedule_linear_and_constant_defaults():
    linear = LRSchedule(decay="linear", total_iterations=10)
    assert linear.factor(0) == 1.0 and linear.factor(5) == pytest.approx(0.5) and linear.factor(10) == 0.0
    assert LRSchedule.from_config(None).is_constant and LRSchedule().factor(123) == 1.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"decay": "step"}, "decay must be one of"),
        ({"decay": "cosine"}, "needs total_iterations"),
        ({"warmup_iterations": -1}, "warmup_iterations"),
        ({"min_factor": 2.0}, "min_factor"),
        ({"warmup": 10}, "unknown key"),
    ],
)
def test_schedule_errors_name_the_option(config, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule.from_config(config)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        opt_ae, opt_disc = trainer.optimizers
        self.rows.append((module.iteration, opt_ae.param_groups[0]["lr"], opt_disc.param_groups[0]["lr"]))


def test_both_optimizers_follow_the_schedule_in_iterations(tiny_ddconfig, tiny_lossconfig):
    schedule = {"warmup_iterations": 2, "decay": "linear", "total_iterations": 6}
    model = make_model(
        tiny_ddconfig,
        tiny_lossconfig,
        disc_start=3,
        learning_rate=1e-3,
        lr_g_factor=0.5,
        lr_schedule=schedule,
        update_schedule="every_batch",
    )
    record = RecordLR()
    trainer = fit(model, 6, [record])
    expected = LRSchedule.from_config(schedule)
    assert [it for it, _, _ in record.rows] == list(range(6))  # one iteration per batch
    for it, lr_ae, lr_disc in record.rows:
        assert lr_ae == pytest.approx(0.5e-3 * expected.factor(it)), it
        assert lr_disc == pytest.approx(1e-3 * expected.factor(it)), it
    assert trainer.global_step > model.iteration  # two optimizers: the schedule must not count global_step


def test_resumed_run_continues_on_the_curve(tiny_ddconfig, tiny_lossconfig, tmp_path):
    schedule = {"warmup_iterations": 4, "decay": "constant"}
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, lr_schedule=schedule)
    trainer = fit(model, 2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, lr_schedule=schedule)
    resumed.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=True))  # what a resume restores
    record = RecordLR()
    fit(resumed, 2, [record])
    assert [row[:2] for row in record.rows] == [(2, pytest.approx(1e-3 * 3 / 4)), (3, pytest.approx(1e-3))]


def test_constant_schedule_leaves_lr_untouched(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, learning_rate=2e-3)
    record = RecordLR()
    fit(model, 3, [record])
    assert {lr for _, lr, _ in record.rows} == {2e-3}


# ------------------------------------------------------------------ fine-tuning
def _klvae_run_with_ema(tiny_ddconfig, tiny_lossconfig, path) -> AutoencoderKL:
    """A klvae run checkpoint whose EMA weights differ from its live weights."""
    source = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, ema_decay=0.5)
    trainer = fit(source, 3)
    assert not torch.equal(source.ema.encoder.conv_in.weight, source.encoder.conv_in.weight)
    trainer.save_checkpoint(path)
    return source


def _frozen_parts(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (
        ("encoder.", model.encoder), ("quant_conv.", model.quant_conv),
        ("ema.encoder.", model.ema.encoder), ("ema.quant_conv.", model.ema.quant_conv),
    ):  # fmt: skip
        out.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
    return out


def test_decoder_only_finetune_keeps_encoder_and_its_ema_exactly(tiny_ddconfig, tiny_lossconfig, tmp_path):
    source = _klvae_run_with_ema(tiny_ddconfig, tiny_lossconfig, tmp_path / "run.ckpt")
    model = make_model(
        tiny_ddconfig, tiny_lossconfig, disc_start=100, ema_decay=0.9, train_decoder_only=True,
        ckpt_path=str(tmp_path / "run.ckpt"),
    )  # fmt: skip
    # Default: the source's EMA weights (what klvae-export writes) are the starting point, decoder included.
    assert torch.equal(model.encoder.conv_in.weight, source.ema.encoder.conv_in.weight)
    assert torch.equal(model.decoder.conv_out.weight, source.ema.decoder.conv_out.weight)
    assert torch.equal(model.ema.decoder.conv_out.weight, source.ema.decoder.conv_out.weight)
    before = _frozen_parts(model)
    fit(model, 4)
    after = _frozen_parts(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(model.ema.decoder.conv_out.weight, source.ema.decoder.conv_out.weight)


def test_ckpt_use_ema_false_takes_live_weights_true_requires_ema(tiny_ddconfig, tiny_lossconfig, tmp_path):
    source = _klvae_run_with_ema(tiny_ddconfig, tiny_lossconfig, tmp_path / "run.ckpt")
    live = make_model(
        tiny_ddconfig, tiny_lossconfig, ckpt_path=str(tmp_path / "run.ckpt"), ckpt_use_ema=False
    )
    assert torch.equal(live.decoder.conv_out.weight, source.decoder.conv_out.weight)
    sd = {
        f"first_stage_model.{k}": v
        for k, v in source.state_dict().items()
        if not k.startswith(("loss.", "ema."))
    }
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    with pytest.raises(ValueError, match="has no EMA weights"):
        make_model(tiny_ddconfig, tiny_lossconfig, ckpt_path=str(tmp_path / "sd.ckpt"), ckpt_use_ema=True)


def test_null_ddconfig_reads_the_network_from_the_checkpoint(tiny_ddconfig, tiny_lossconfig, tmp_path):
    source = _klvae_run_with_ema(tiny_ddconfig, tiny_lossconfig, tmp_path / "run.ckpt")
    model = AutoencoderKL(None, tiny_lossconfig, embed_dim=4, ckpt_path=str(tmp_path / "run.ckpt"))
    assert model.hparams.ddconfig == tiny_ddconfig
    assert torch.equal(model.decoder.conv_out.weight, source.ema.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="ckpt_path to read it from"):
        AutoencoderKL(None, tiny_lossconfig, embed_dim=4)


def test_wrong_ddconfig_for_the_checkpoint_is_a_clear_error(tiny_ddconfig, tiny_lossconfig, tmp_path):
    _klvae_run_with_ema(tiny_ddconfig, tiny_lossconfig, tmp_path / "run.ckpt")
    wider = {**tiny_ddconfig, "ch": 16}
    with pytest.raises(ValueError, match=r"different network.*ddconfig to null"):
        make_model(wider, tiny_lossconfig, ckpt_path=str(tmp_path / "run.ckpt"))


# ------------------------------------------------------------------ validation in familiar units
def test_validation_logs_psnr_ssim_lpips_with_ema_weights(tiny_ddconfig, tiny_lossconfig):
    from klvae.evaluation.metrics import reconstruction_scores
    from tests.models.test_autoencoder import loader

    model = make_model(tiny_ddconfig, tiny_lossconfig, ema_decay=0.5)
    trainer = fit(model, 2, val_batches=2)
    logged = trainer.callback_metrics
    assert {"val/psnr", "val/ssim", "val/lpips", "val/rec_loss"} <= set(logged)
    # Recompute with the EMA weights: the logged numbers are theirs (mean over the 2 validation batches).
    model.eval()
    psnrs = []
    with torch.no_grad(), model.ema_scope():
        for i, batch in enumerate(loader(8)):
            if i == 2:
                break
            x = batch["image"]
            psnrs.append(reconstruction_scores(x, model.decode(model.encode(x).mode()))["psnr"])
    assert logged["val/psnr"].item() == pytest.approx(torch.cat(psnrs).mean().item(), rel=1e-4)
