"""AutoencoderKL: the manual-optimization schedule, counters, accumulation, EMA, checkpoints, warm start."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, size: int = 32) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.size, self.size, generator=g) * 2 - 1}


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RandomImages(n), batch_size=2)


GROUPS = {
    "encoder": lambda m: m.encoder,
    "quant_conv": lambda m: m.quant_conv,
    "decoder": lambda m: m.decoder,
    "discriminator": lambda m: m.loss.discriminator,
    "lpips": lambda m: m.loss.perceptual_loss,
}


class MovedParameters(pl.Callback):
    """Records, per training iteration, which parameter groups changed during that batch."""

    def __init__(self) -> None:
        self.moved: list[set[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = {n: [p.detach().clone() for p in g(module).parameters()] for n, g in GROUPS.items()}
        self.logvar = module.loss.logvar.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        moved = {
            n
            for n, g in GROUPS.items()
            if any(not torch.equal(a, b) for a, b in zip(self.before[n], g(module).parameters(), strict=True))
        }
        if not torch.equal(self.logvar, module.loss.logvar):
            moved.add("logvar")
        self.moved.append(moved)


def make_model(tiny_ddconfig, tiny_lossconfig, disc_start: int = 2, **params) -> AutoencoderKL:
    tiny_lossconfig["params"]["disc_start"] = disc_start
    params.setdefault("learning_rate", 1e-3)
    return AutoencoderKL(tiny_ddconfig, tiny_lossconfig, embed_dim=4, **params)


def fit(model: AutoencoderKL, batches: int, callbacks=(), val_batches: int = 0) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, loader(), loader(8) if val_batches else None)
    return trainer


def test_alternate_schedule_updates_one_side_per_iteration(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=2)
    record = MovedParameters()
    fit(model, 6, [record])
    ae = {"encoder", "quant_conv", "decoder"}
    assert record.moved == [ae, ae, ae, {"discriminator"}, ae, {"discriminator"}]


def test_every_batch_schedule_updates_both_after_disc_start(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=2, update_schedule="every_batch")
    record = MovedParameters()
    trainer = fit(model, 5, [record])
    ae = {"encoder", "quant_conv", "decoder"}
    assert record.moved == [ae, ae, ae | {"discriminator"}, ae | {"discriminator"}, ae | {"discriminator"}]
    # Lightning's global_step counts optimizer steps (2 + 2·3); disc_start must use iterations instead.
    assert model.iteration == 5
    assert trainer.global_step == 8


def test_gan_terms_logged_zero_before_and_active_after_disc_start(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=3, update_schedule="every_batch")

    class Grab(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append(
                (m["train/disc_factor"].item(), m["train/g_loss"].item(), m["train/d_weight"].item())
            )

    grab = Grab()
    fit(model, 4, [grab])
    assert grab.rows[:3] == [(0.0, 0.0, 0.0)] * 3
    factor, g_loss, d_weight = grab.rows[3]
    assert factor == 1.0 and g_loss != 0.0 and d_weight > 0.0


def test_accumulation_steps_every_k_batches(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, accumulate_grad_batches=2)
    record = MovedParameters()
    fit(model, 4, [record])
    ae = {"encoder", "quant_conv", "decoder"}
    assert record.moved == [set(), ae, set(), ae]
    assert model.iteration == 2


def test_gradient_clipping_bounds_the_norm_seen_by_the_optimizer(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, gradient_clip_val=1e-3)
    norms = []

    class Hook(pl.Callback):
        def on_train_start(self, trainer, module):
            def record(optimizer, args, kwargs):
                grads = [
                    p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
                ]
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

            # after the step: clipping happens inside optimizer.step() (on_before_optimizer_step)
            trainer.optimizers[0].register_step_post_hook(record)

    fit(model, 2, [Hook()])
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms)


def test_decoder_only_training_freezes_encoder(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, train_decoder_only=True)
    record = MovedParameters()
    fit(model, 2, [record])
    assert record.moved == [{"decoder"}, {"decoder"}]


def test_learned_logvar_is_optimised(tiny_ddconfig, tiny_lossconfig):
    tiny_lossconfig["params"]["learn_logvar"] = True
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100)
    record = MovedParameters()
    fit(model, 1, [record])
    assert "logvar" in record.moved[0]


def test_optimizers_use_lr_g_factor_and_betas(tiny_ddconfig, tiny_lossconfig):
    model = make_model(
        tiny_ddconfig, tiny_lossconfig, learning_rate=2e-4, lr_g_factor=0.5, adam_betas=[0.4, 0.8]
    )
    opt_ae, opt_disc = model.configure_optimizers()
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert opt_ae.param_groups[0]["betas"] == (0.4, 0.8)
    ae_ids = {id(p) for p in opt_ae.param_groups[0]["params"]}
    assert ae_ids.isdisjoint(id(p) for p in model.loss.parameters())
    assert {id(p) for p in opt_disc.param_groups[0]["params"]} == {
        id(p) for p in model.loss.discriminator.parameters()
    }


def test_lpips_stays_in_eval_mode_after_model_train(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig).train()
    assert model.loss.discriminator.training
    assert not any(m.training for m in model.loss.perceptual_loss.modules())


def test_ema_tracks_weights_and_is_used_inside_scope(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=100, ema_decay=0.5)
    fit(model, 3, val_batches=1)
    live = model.decoder.conv_out.weight.detach().clone()
    shadow = model.ema.decoder.conv_out.weight.detach().clone()
    assert not torch.equal(live, shadow)
    assert int(model.ema.num_updates) == 3
    with model.ema_scope():
        assert torch.equal(model.decoder.conv_out.weight, shadow)
    assert torch.equal(model.decoder.conv_out.weight, live)
    assert "ema.decoder.conv_out.weight" in model.state_dict()


def test_checkpoint_loads_weights_only_and_restores_iteration(tiny_ddconfig, tiny_lossconfig, tmp_path):
    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=1, ema_decay=0.9)
    trainer = fit(model, 3)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["klvae"]["iteration"] == 3
    assert len(checkpoint["optimizer_states"]) == 2
    restored = AutoencoderKL.load_from_checkpoint(path)
    assert restored.iteration == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, msg=key)


def test_warm_start_from_sd_checkpoint_with_prefix(tiny_ddconfig, tiny_lossconfig, tmp_path):
    source = make_model(tiny_ddconfig, tiny_lossconfig)
    sd = {f"first_stage_model.{k}": v for k, v in source.state_dict().items() if not k.startswith("loss.")}
    sd["model.diffusion_model.out.weight"] = torch.zeros(1)  # the rest of an SD checkpoint: ignored
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    model = make_model(tiny_ddconfig, tiny_lossconfig, ckpt_path=str(tmp_path / "sd.ckpt"), ema_decay=0.9)
    for key in ("encoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight", "post_quant_conv.bias"):
        torch.testing.assert_close(model.state_dict()[key], source.state_dict()[key])
    # EMA starts from the loaded weights, not from the random init.
    torch.testing.assert_close(model.ema.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_warm_start_missing_network_tensors_raises(tiny_ddconfig, tiny_lossconfig, tmp_path):
    source = make_model(tiny_ddconfig, tiny_lossconfig)
    torch.save(source.state_dict(), tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match="lacks .* autoencoder tensors"):
        make_model(
            tiny_ddconfig, tiny_lossconfig, ckpt_path=str(tmp_path / "full.ckpt"), ignore_keys=["decoder."]
        )


def test_log_images_returns_inputs_reconstructions_samples(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig)
    batch = {"image": torch.rand(5, 3, 32, 32) * 2 - 1}
    images = model.log_images(batch, N=3)
    assert set(images) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (3, 3, 32, 32) for v in images.values())


def test_channels_last_batch_is_rejected_with_shape(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\)"):
        model.get_input({"image": torch.rand(2, 32, 32, 3)})


@pytest.mark.parametrize(("key", "value"), [("update_schedule", "both"), ("accumulate_grad_batches", 0)])
def test_invalid_module_option_raises_naming_it(tiny_ddconfig, tiny_lossconfig, key, value):
    with pytest.raises(ValueError, match=key):
        make_model(tiny_ddconfig, tiny_lossconfig, **{key: value})


def test_ema_warmup_matches_litema_counting_after_increment():
    from klvae.models.ema import ModuleEMA

    live = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(live.weight)
    ema = ModuleEMA({"m": live}, decay=0.9999)
    expected = torch.zeros(())
    for n in range(1, 4):
        live.weight.data.fill_(float(n))
        ema.update({"m": live})
        d = min(0.9999, (1 + n) / (10 + n))  # LDM's LitEma: num_updates += 1, then this decay
        expected = d * expected + (1 - d) * n
        torch.testing.assert_close(ema.m.weight[0, 0], expected)
    assert int(ema.num_updates) == 3
    restored = ModuleEMA({"m": live}, decay=0.9999)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay_for_update(int(restored.num_updates) + 1) == pytest.approx(5 / 14)


@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_csv_rows_hold_only_what_their_step_computed(tiny_ddconfig, tiny_lossconfig, tmp_path, schedule):
    """Lightning re-logs a step metric's last value on later steps; after disc_start the alternate schedule
    would then write a stale copy of the generator or the discriminator losses into every row."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=2, update_schedule=schedule)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=8, limit_val_batches=0,
                         logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader())
    (path,) = tmp_path.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(path.open()) if row.get("train/iteration")]
    assert len(rows) == 8
    for row in rows:
        it = int(float(row["train/iteration"])) - 1  # logged after the update: the count of updates made
        generator = it < 2 or schedule == "every_batch" or it % 2 == 0
        discriminator = it >= 2 and (schedule == "every_batch" or it % 2 == 1)
        assert bool(row["train/total_loss"]) == generator, row
        assert bool(row["train/disc_loss"]) == discriminator, row
    for key in ("train/total_loss", "train/disc_loss", "train/g_loss"):
        values = [row[key] for row in rows if row[key] and float(row[key]) != 0]  # g_loss is 0 pre-GAN
        assert len(values) == len(set(values)), (key, values)  # no value carried over into another row


def test_an_even_log_cadence_still_writes_the_generator_losses_of_the_alternate_schedule(
    tiny_ddconfig, tiny_lossconfig, tmp_path
):
    """log_every_n_steps=2 writes rows only after odd iterations, the discriminator's in the alternate
    schedule: each row also carries the generator losses of the update just before, which no row held yet;
    no value is written twice."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    model = make_model(tiny_ddconfig, tiny_lossconfig, disc_start=2, update_schedule="alternate")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=10, limit_val_batches=0,
                         logger=CSVLogger(tmp_path), log_every_n_steps=2, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader())
    (path,) = tmp_path.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(path.open()) if row.get("train/iteration")]
    assert [int(float(r["train/iteration"])) for r in rows] == [2, 4, 6, 8, 10]
    gan_rows = rows[1:]  # iterations 3, 5, 7, 9 (0-based) were discriminator updates
    assert all(
        r["train/total_loss"] and r["train/disc_loss"] and float(r["train/d_weight"]) > 0 for r in gan_rows
    )
    for key in ("train/total_loss", "train/g_loss", "train/disc_loss"):
        values = [r[key] for r in gan_rows]
        assert len(values) == len(set(values)), (key, values)
