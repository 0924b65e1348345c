"""klvae.perf: every speed switch keeps the numbers of the plain fp32 path."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from klvae.models.autoencoder import AutoencoderKL
from klvae.modules.losses import LPIPSWithDiscriminator
from klvae.modules.perceptual import load_lpips
from klvae.modules.vae import KLAutoencoder
from klvae.perf.apply import make_adam
from klvae.perf.options import Optimizations, parse_optimizations

PLAIN = {
    "compile": False,
    "fused_adam": False,
    "lpips_target_no_grad": False,
    "gradient_checkpointing": False,
}


# ---------------------------------------------------------------- options
def test_unknown_optimizations_key_is_named():
    with pytest.raises(ValueError, match="compiel"):
        parse_optimizations({"compiel": True})


@pytest.mark.parametrize(
    "bad", [{"compile": "yes"}, {"compile_regions": "encoder"}, {"channels_last": "lpips"},
            {"compile_mode": "fast"}, {"gradient_checkpointing": None}],
)  # fmt: skip
def test_invalid_optimizations_values_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        parse_optimizations(bad)


def test_auto_switches_follow_the_device():
    opts = Optimizations()
    assert not opts.compile_on("cpu") and not opts.fused_adam_on("cpu") and not opts.cudnn_benchmark_on("cpu")
    assert opts.compile_on("cuda") and opts.fused_adam_on("cuda") and opts.cudnn_benchmark_on("cuda")
    assert Optimizations(compile=True).compile_on("cpu")


@pytest.mark.parametrize("field", ["compile_regions", "channels_last"])
def test_model_rejects_a_region_it_does_not_have(tiny_ddconfig, tiny_lossconfig, field):
    with pytest.raises(
        ValueError, match=rf"{field}: unknown region\(s\) \['vgg'\].*'discriminator', 'encoder'"
    ):
        AutoencoderKL(tiny_ddconfig, tiny_lossconfig, embed_dim=4, optimizations={field: ["encoder", "vgg"]})


def test_model_rejects_unknown_optimization(tiny_ddconfig, tiny_lossconfig):
    with pytest.raises(ValueError, match="fused_adamw"):
        AutoencoderKL(tiny_ddconfig, tiny_lossconfig, embed_dim=4, optimizations={"fused_adamw": True})


@pytest.fixture(scope="module")
def lpips_model():
    return load_lpips("random")


def test_generator_loss_same_with_lpips_target_no_grad():
    from klvae.modules.distributions import DiagonalGaussianDistribution

    torch.manual_seed(0)
    loss_fn = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.5, perceptual_backbone="random",
                                     pixel_loss="l2", disc_num_layers=2, disc_ndf=8)  # fmt: skip
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    results = []
    for flag in (False, True):
        loss_fn.lpips_target_no_grad = flag
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, iteration=0)
        results.append((loss, logs["train/p_loss"], torch.autograd.grad(loss, x_hat)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- switches inside AutoencoderKL
def _fit(model: AutoencoderKL, steps: int, precision: str = "32-true") -> pl.Trainer:
    torch.manual_seed(1)
    data = [{"image": torch.rand(2, 3, 32, 32) * 2 - 1} for _ in range(steps)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         precision=precision, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    return trainer


def _model(ddconfig, lossconfig, opts, schedule="every_batch") -> AutoencoderKL:
    torch.manual_seed(0)
    lossconfig["params"]["disc_start"] = 1  # iteration 0 without, iteration 1 with the GAN
    return AutoencoderKL(ddconfig, lossconfig, embed_dim=4, learning_rate=1e-3, update_schedule=schedule,
                         optimizations=opts)  # fmt: skip


def test_optimized_step_matches_plain_fp32_step(tiny_ddconfig, tiny_lossconfig):
    fast = {
        "compile": False,
        "fused_adam": True,
        "lpips_target_no_grad": True,
        "gradient_checkpointing": True,
    }
    plain = _model(tiny_ddconfig, copy.deepcopy(tiny_lossconfig), PLAIN)
    opt = _model(tiny_ddconfig, copy.deepcopy(tiny_lossconfig), fast)
    opt.load_state_dict(plain.state_dict())
    assert opt.encoder.gradient_checkpointing and opt.loss.lpips_target_no_grad
    t_plain, t_opt = _fit(plain, 2), _fit(opt, 2)
    assert opt.optimizers()[0].defaults["fused"] and not plain.optimizers()[0].defaults["fused"]
    for key in ("train/total_loss", "train/p_loss", "train/g_loss", "train/disc_loss"):
        torch.testing.assert_close(
            t_opt.callback_metrics[key], t_plain.callback_metrics[key], rtol=1e-4, atol=1e-6
        )
    for (name, p), q in zip(plain.named_parameters(), opt.parameters()):
        if name.endswith("attn_1.k.bias"):
            # softmax(q·(k+b)) does not depend on b: its gradient is rounding noise, which Adam scales to ±lr.
            continue
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ddconfig):
    torch.manual_seed(0)
    vae = KLAutoencoder.from_ddconfig(tiny_ddconfig, 4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for flag in (False, True):
        vae.encoder.gradient_checkpointing = vae.decoder.gradient_checkpointing = flag
        vae.zero_grad()
        recon, post = vae(x, sample_posterior=False)
        ((recon - x) ** 2 + post.kl().mean()).sum().backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_weights_stay_fp32_after_a_bf16_autocast_step(tiny_ddconfig, tiny_lossconfig):
    model = _model(tiny_ddconfig, tiny_lossconfig, PLAIN)
    before = model.decoder.conv_out.weight.detach().clone()
    _fit(model, 1, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.decoder.conv_out.weight)
    state = model.optimizers()[0].optimizer.state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_compile_in_place_keeps_state_dict_keys(tiny_ddconfig, tiny_lossconfig):
    model = _model(tiny_ddconfig, tiny_lossconfig, {"compile": True, "channels_last": ["lpips"]})
    keys = list(model.state_dict())
    applied = model.apply_optimizations(torch.device("cpu")).descriptions
    assert "compile:encoder" in applied and "channels_last:lpips" in applied
    assert list(model.state_dict()) == keys
    assert model.loss.perceptual_loss.net.slice1[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_make_adam_fused_flag():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert make_adam(p, 1e-3, (0.5, 0.9), fused=True).defaults["fused"]
    assert not make_adam(p, 1e-3, (0.5, 0.9), fused=False).defaults["fused"]


# ---------------------------------------------------------------- torch.compile
def test_compile_regions_have_no_graph_breaks(tiny_ddconfig, lpips_model):
    from klvae.modules.discriminator import NLayerDiscriminator

    torch._dynamo.reset()
    vae = KLAutoencoder.from_ddconfig(tiny_ddconfig, 4)
    x = torch.rand(1, 3, 32, 32)
    for module, inp in [(vae.encoder, x), (vae.decoder, torch.rand(1, 4, 4, 4)), (lpips_model.net, x),
                        (NLayerDiscriminator(3, 8, 2), x)]:  # fmt: skip
        explanation = torch._dynamo.explain(module)(inp)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_encoder_decoder_match_eager(tiny_ddconfig):
    torch._dynamo.reset()
    torch.manual_seed(0)
    vae = KLAutoencoder.from_ddconfig(tiny_ddconfig, 4)
    x = torch.rand(2, 3, 32, 32)
    recon_ref, _ = vae(x, sample_posterior=False)
    g_ref = torch.autograd.grad(recon_ref.square().sum(), list(vae.parameters()))
    vae.encoder.compile()
    vae.decoder.compile()
    recon, _ = vae(x, sample_posterior=False)
    grads = torch.autograd.grad(recon.square().sum(), list(vae.parameters()))
    torch.testing.assert_close(recon, recon_ref, rtol=1e-4, atol=1e-5)
    # Fused kernels reorder fp32 sums; some gradients are pure rounding noise (attention's k bias cannot
    # change softmax), so compare against the overall gradient scale.
    scale = max(g.abs().max().item() for g in g_ref)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)


# ---------------------------------------------------------------- compile backends and graph counting
def test_compile_backend_option_is_validated():
    assert parse_optimizations({"compile_backend": "aot_eager"}).compile_backend == "aot_eager"
    with pytest.raises(ValueError, match="compile_backend"):
        parse_optimizations({"compile_backend": "tensorrt"})
    with pytest.raises(ValueError, match="compile_mode"):
        parse_optimizations({"compile_backend": "aot_eager", "compile_mode": "max-autotune"})


def test_lpips_trunk_region_is_really_compiled_and_counted(tiny_ddconfig, tiny_lossconfig):
    from klvae.modules.distributions import DiagonalGaussianDistribution

    torch._dynamo.reset()
    model = _model(tiny_ddconfig, tiny_lossconfig, {"compile": True, "compile_backend": "aot_eager",
                                                    "compile_regions": ["lpips"]})  # fmt: skip
    model.apply_optimizations(torch.device("cpu"))
    assert model.graph_counts() == {"lpips": 0}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = x.clone().requires_grad_(True)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    for _ in range(3):
        loss, _ = model.loss.generator_loss(x, x_hat, posterior, 0)
        loss.backward()
    # The input's branch (no gradient needed) and the reconstruction's: two graphs, no recompiles after.
    assert model.graph_counts() == {"lpips": 2}
    torch._dynamo.reset()


def test_compile_dynamic_compiles_a_bounded_number_of_graphs_for_many_bucket_shapes(caplog):
    """With compile_dynamic a region compiles a few graphs whatever the number of bucket shapes and batch
    sizes; torch's default recompiles as sizes change and reaches dynamo's recompile limit (8), after
    which the region runs eager (tests/models/test_compiled_training.py runs the whole step)."""
    import logging

    from klvae.data.buckets import make_buckets
    from klvae.modules.model import Encoder
    from klvae.perf.apply import apply_runtime_optimizations
    from tests.conftest import tiny_ddconfig_dict

    caplog.set_level(logging.INFO, logger="klvae.perf.apply")
    torch._dynamo.reset()
    encoder = Encoder(**tiny_ddconfig_dict(levels=2))
    opts = parse_optimizations({"compile": True, "compile_backend": "aot_eager", "compile_dynamic": True})
    applied = apply_runtime_optimizations({"encoder": encoder}, opts, torch.device("cpu"))
    shapes = [(2, *hw) for hw in make_buckets(32, 8)] + [(3, *hw) for hw in make_buckets(48, 8)]
    try:
        for batch, height, width in shapes:  # 8 shapes, as a run with two phases of buckets sees them
            x = torch.randn(batch, 3, height, width)
            encoder(x).sum().backward()  # the autoencoder update
            with torch.no_grad():
                encoder(x)  # the alternate schedule's reconstruction for the discriminator update
    finally:
        torch._dynamo.reset()
    graphs = applied.graph_counts()["encoder"]
    assert 2 <= graphs <= 4 < len(shapes), graphs
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


def test_a_region_reaching_the_recompile_limit_is_a_loud_warning(caplog):
    import logging

    from klvae.perf.apply import RegionBackend

    backend = RegionBackend("decoder", "aot_eager", None)
    backend._compile = lambda gm, inputs: gm  # count only
    with caplog.at_level(logging.WARNING, logger="klvae.perf.apply"):
        for _ in range(torch._dynamo.config.recompile_limit):
            backend(None, [])
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "region decoder has compiled 8 graphs" in record.getMessage()
    assert "compile_dynamic: true" in record.getMessage()
