"""AutoencoderKL with EQ-VAE's regulariser: off is today's step bit for bit; on, each batch runs the branch
its seeded draw says, through both schedules, decoder-only training, EMA, the GAN phase, 4 and 16 channels."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL, _Forward
from klvae.modules.adaptive import LastLayer
from klvae.modules.equivariance import Branch, EquivarianceSchedule
from tests.models.test_autoencoder import RandomImages


def fit(model: AutoencoderKL, batches: int, size: int = 32, callbacks=()) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    torch.manual_seed(1)  # posterior samples
    trainer.fit(model, torch.utils.data.DataLoader(RandomImages(2 * batches, size), batch_size=2))


def make_model(ddconfig, lossconfig, channels: int = 4, **params) -> AutoencoderKL:
    ddconfig = {**ddconfig, "z_channels": channels}
    torch.manual_seed(0)
    return AutoencoderKL(
        ddconfig, copy.deepcopy(lossconfig), embed_dim=channels, learning_rate=1e-3, **params
    )


def legacy_reconstruct(self: AutoencoderKL, x: torch.Tensor, branch: Branch, for_generator: bool):
    """The reconstruction exactly as the step ran before the EQ-VAE option existed: no branch."""
    assert branch == Branch()
    if self.train_decoder_only:
        with torch.no_grad():
            posterior = self.encode(x)
    else:
        posterior = self.encode(x)
    z = posterior.sample()
    recon, last_input = self.decoder(self.post_quant_conv(z), return_last_input=True)
    return _Forward(recon, posterior, z, LastLayer(self.decoder.conv_out, last_input), None)


@pytest.mark.parametrize(("schedule", "decoder_only"), [("every_batch", False), ("alternate", True)])
def test_regulariser_off_is_bit_identical_to_the_plain_step(
    tiny_ddconfig, tiny_lossconfig, schedule, decoder_only, monkeypatch
):
    tiny_lossconfig["params"]["disc_start"] = 2  # both phases within 4 iterations
    params = {"update_schedule": schedule, "train_decoder_only": decoder_only, "ema_decay": 0.9}
    states = []
    for equivariance in ("legacy", None, {"p": 0.0, "p_small": 0.0}):
        with monkeypatch.context() as m:
            if equivariance == "legacy":
                m.setattr(AutoencoderKL, "_reconstruct", legacy_reconstruct)
            model = make_model(tiny_ddconfig, tiny_lossconfig, equivariance=None if equivariance == "legacy" else equivariance, **params)  # fmt: skip
            fit(model, 4)
        states.append(model.state_dict())
    legacy = states[0]
    for state in states[1:]:
        assert state.keys() == legacy.keys()
        for k in legacy:
            assert torch.equal(state[k], legacy[k]), k


class ShapeSpy(pl.Callback):
    """Per batch: the encoder's input, the decoder's latent, and every (target, x̂) the losses saw."""

    def __init__(self, model: AutoencoderKL) -> None:
        self.rows: list[dict] = []
        model.encoder.register_forward_pre_hook(lambda m, a: self._shape("enc", a[0].shape[-2:]))
        model.post_quant_conv.register_forward_pre_hook(lambda m, a: self._shape("dec", a[0].shape[1:]))
        gen, disc = model.loss.generator_loss, model.loss.discriminator_loss
        model.loss.generator_loss = lambda x, r, *a, **k: self._log("gen", x, r, gen(x, r, *a, **k))
        model.loss.discriminator_loss = lambda x, r, *a, **k: self._log("disc", x, r, disc(x, r, *a, **k))
        adaptive = model.loss.adaptive_weight

        def spy_adaptive(grad_nll, grad_g, last_layer):
            # the conv_out input saved for λ is the one of the decode that made this x̂ (∂nll/∂x̂'s shape)
            self.row["adaptive"] = (last_layer.inputs.shape[-2:], grad_nll.shape[-2:])
            return adaptive(grad_nll, grad_g, last_layer)

        model.loss.adaptive_weight = spy_adaptive

    def _shape(self, name, shape) -> None:  # a pre-hook returning a value would replace the module's input
        self.row.setdefault(name, shape)

    def _log(self, name, target, recon, out):
        self.row[name] = (target.shape[-2:], recon.shape[-2:])
        return out

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.row = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.row["branch"] = trainer.callback_metrics["train/eq_branch"].item()
        self.rows.append(self.row)


@pytest.mark.parametrize(
    ("config", "schedule", "decoder_only", "channels"),
    [
        ({"p": 1.0, "seed": 5}, "every_batch", False, 4),
        ({"p": 0.5, "p_small": 1.0, "anisotropic": True}, "alternate", True, 16),
    ],
)
def test_each_batch_runs_its_drawn_branch(
    tiny_ddconfig, tiny_lossconfig, config, schedule, decoder_only, channels
):
    tiny_lossconfig["params"]["disc_start"] = 1
    model = make_model(tiny_ddconfig, tiny_lossconfig, channels, equivariance=config, update_schedule=schedule,
                       train_decoder_only=decoder_only, ema_decay=0.9)  # fmt: skip
    spy = ShapeSpy(model)
    batches = 6
    fit(model, batches, size=64, callbacks=[spy])
    schedule_ = EquivarianceSchedule.from_config(config)
    seen = set()
    for i, row in enumerate(spy.rows):
        branch = schedule_.draw(i)
        seen.add(branch.name)
        assert row["branch"] == branch.index
        x = torch.zeros(1, 3, 64, 64)
        enc_in = branch.encoder_input(x, 8)
        z = torch.zeros(1, channels, enc_in.shape[-2] // 8, enc_in.shape[-1] // 8)
        target, latent = branch.target(enc_in, 8), branch.latent(z)
        assert row["enc"] == enc_in.shape[-2:]
        assert row["dec"] == latent.shape[1:]  # (C, h', w'): the decoder got τ(z)
        for name in ("gen", "disc"):
            if name in row:  # target and x̂ agree, and are τ(x) in the equivariance branch
                assert row[name] == (target.shape[-2:], target.shape[-2:]), (i, branch, row)
        if "adaptive" in row:
            assert row["adaptive"] == (target.shape[-2:], target.shape[-2:])
    assert any("adaptive" in r for r in spy.rows) and any("disc" in r for r in spy.rows)
    expected = {"equivariance"} if config["p"] == 1.0 else {"equivariance", "prior_small"}
    assert seen == expected
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.ema is not None and model.iteration == batches


def test_equivariance_option_is_saved_and_checked(tiny_ddconfig, tiny_lossconfig):
    model = make_model(tiny_ddconfig, tiny_lossconfig, equivariance={"p": 0.5, "p_small": 0.25})
    assert model.hparams["equivariance"] == {"p": 0.5, "p_small": 0.25}
    assert make_model(tiny_ddconfig, tiny_lossconfig).equivariance is None
    with pytest.raises(ValueError, match="unknown keys"):
        make_model(tiny_ddconfig, tiny_lossconfig, equivariance={"p": 0.5, "prob": 1})


def test_finetune_eqvae_recipe_values():
    from pathlib import Path

    from klvae.util import load_config

    cfg = load_config([Path(__file__).resolve().parents[2] / "configs" / "finetune_eqvae.yaml"])
    params = cfg.model.params
    loss = params.lossconfig.params
    assert (params.equivariance.p, params.equivariance.p_small, params.equivariance.anisotropic) == (
        0.5,
        0.25,
        False,
    )
    assert (loss.disc_start, loss.disc_weight, loss.kl_weight, loss.pixel_loss, loss.perceptual_weight) == (
        0, 0.5, 1e-6, "l1", 1.0,
    )  # fmt: skip
    assert cfg.model.base_learning_rate == 4.5e-6 and params.accumulate_grad_batches == 2
    assert cfg.data.params.batch_size == 10 and not params.train_decoder_only
    assert params.update_schedule == "every_batch" and params.ema_decay is None
