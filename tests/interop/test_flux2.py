"""FLUX.2's VAE in and out: diffusers' ``AutoencoderKLFlux2`` (random weights, random BatchNorm statistics) read
strictly, the latents FLUX.2's pipeline would give its transformer, export back to diffusers and to FLUX.2's
own ``ae.safetensors`` layout, the decoder-only recipe through ``main.py`` with the statistics frozen, and
``klvae-latent-stats`` filling a new VAE's BatchNorm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from klvae.inference import InferenceVAE
from klvae.interop.configs import network_from_diffusers_config
from klvae.interop.formats import VAEWeights, read_vae_weights, with_batch_norm_statistics, write_vae
from klvae.interop.keys import ldm_to_diffusers
from klvae.modules.config import LatentBatchNormConfig
from klvae.modules.vae import KLAutoencoder
from tests.interop.helpers import flux2_pipeline_decode, flux2_pipeline_latents

LATENT = (
    32  # FLUX.2's latent channels. The tiny network is f = 2 with widths 32/64: FLUX.2's own code hard-codes
)
# GroupNorm(32), and a bare ae.safetensors (no config) implies 32 groups only when they divide every width.
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _flux2_diffusers(seed: int = 0) -> AutoencoderKLFlux2:
    """A tiny AutoencoderKLFlux2 with every weight and both BatchNorm statistics random."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=LATENT, norm_num_groups=32,
        sample_size=32,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        model.bn.running_mean.normal_(0.0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _image(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # non-square


def _assert_same_as_diffusers(ours: InferenceVAE, theirs: AutoencoderKLFlux2) -> None:
    """Raw latents, FLUX.2's normalised latents (its pipeline's own code) and both decodes agree to 1e-4."""
    x = _image()
    with torch.no_grad():
        mean = theirs.encode(x).latent_dist.mode()  # (1, 32, 32, 48)
        torch.testing.assert_close(ours.encode(x), mean, **TOL)
        torch.testing.assert_close(ours.decode(mean), theirs.decode(mean).sample, **TOL)
    normalised = flux2_pipeline_latents(theirs, x)  # (1, 128, 16, 24)
    assert normalised.shape == (1, 4 * LATENT, 16, 24)
    torch.testing.assert_close(ours.encode(x, scale=True), normalised, **TOL)
    torch.testing.assert_close(
        ours.decode(normalised, scale=True), flux2_pipeline_decode(theirs, normalised), **TOL
    )


def test_flux2_folder_loads_strictly_and_exports_back_for_diffusers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _flux2_diffusers()
    source.save_pretrained(tmp_path / "source")

    vae = InferenceVAE.from_pretrained(tmp_path / "source")
    network = vae.model.network
    assert network.latent_batch_norm == LatentBatchNormConfig((2, 2), 1e-4, 0.1, False)
    assert (network.z_channels, network.embed_dim, network.use_quant_conv) == (LATENT, LATENT, True)
    assert (vae.scaling_factor, vae.shift_factor) == (None, None)  # AutoencoderKLFlux2 has no factors
    ldm = vae.model.state_dict()
    assert len(ldm) == len(source.state_dict())  # strict: every tensor, nothing more
    assert torch.equal(ldm["bn.running_var"], source.bn.running_var)
    _assert_same_as_diffusers(vae, source)

    write_vae(read_vae_weights(tmp_path / "source"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and "scaling_factor" not in config
    assert (config["batch_norm_eps"], config["batch_norm_momentum"], config["patch_size"]) == (
        1e-4,
        0.1,
        [2, 2],
    )
    theirs = AutoencoderKLFlux2.from_pretrained(tmp_path / "out").eval()
    assert theirs.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in theirs.state_dict().items())
    _assert_same_as_diffusers(vae, theirs)


def test_full_size_flux2_network_is_diffusers_default_autoencoderklflux2() -> None:
    # A config.json with only the class name means FLUX.2's published VAE (diffusers' defaults).
    network = network_from_diffusers_config({"_class_name": "AutoencoderKLFlux2"})
    assert (network.ch, network.ch_mult, network.num_res_blocks, network.z_channels) == (
        128,
        (1, 2, 4, 4),
        2,
        32,
    )
    with torch.device("meta"):
        ours = KLAutoencoder(network)
        theirs = AutoencoderKLFlux2()
    renamed = ldm_to_diffusers(ours.state_dict())
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert len(renamed) == 251  # kl-f8's 248 + bn.running_mean, bn.running_var, bn.num_batches_tracked
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_flux2_own_layout_nests_the_quant_convs_and_reads_back(tmp_path) -> None:
    source = _flux2_diffusers()
    source.save_pretrained(tmp_path / "source")
    weights = read_vae_weights(tmp_path / "source")
    path = write_vae(weights, tmp_path / "ae.safetensors", "flux2-ae")
    keys = set(load_file(str(path)))
    # black-forest-labs/flux2: Encoder.quant_conv, Decoder.post_quant_conv, AutoEncoder.bn; the rest LDM's names.
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_mean"} <= keys
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)
    assert keys - {"encoder.quant_conv.weight", "encoder.quant_conv.bias", "decoder.post_quant_conv.weight",
                   "decoder.post_quant_conv.bias"} == set(weights.state_dict) - {
        "quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"}  # fmt: skip
    back = read_vae_weights(path)
    assert back.source_format == "flux2-ae" and back.network == weights.network
    assert all(torch.equal(back.state_dict[k], v) for k, v in weights.state_dict.items())
    # FLUX.2's file as BFL's code alone would have it (no metadata, maybe no counter: diffusers' conversion
    # copies only the statistics): the tensors say everything.
    bare = {k: v for k, v in load_file(str(path)).items() if k != "bn.num_batches_tracked"}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with safe_open(str(tmp_path / "bare.safetensors"), "pt") as f:
        assert not f.metadata()
    vae = InferenceVAE.from_pretrained(tmp_path / "bare.safetensors")
    assert vae.model.network.latent_batch_norm == LatentBatchNormConfig()
    _assert_same_as_diffusers(vae, source)


class BatchNormModeProbe(pl.Callback):
    """Records (model.training, model.bn.training) at every training batch; written to ``out`` at the end."""

    def __init__(self, out: str) -> None:
        self.out, self.seen = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001 (Lightning's)
        self.seen.append([pl_module.training, pl_module.bn.training])

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.out.write_text(json.dumps(self.seen))


def test_main_py_decoder_fine_tune_keeps_the_batch_norm_statistics(tmp_path, photos, monkeypatch) -> None:
    # The shipped recipe as a user runs it (main.py, folder data, a diffusers FLUX.2 folder), shrunk, through
    # disc_start: Lightning puts the model in train mode, the BatchNorm stays in eval, its statistics and the
    # encoder do not move (live, EMA, export), the decoder trains, and diffusers reads the export.
    from klvae.training.cli import main
    from tests.cli_helpers import only_run_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _flux2_diffusers()
    source.save_pretrained(tmp_path / "flux2-vae")
    configs = Path(__file__).resolve().parents[2] / "configs"
    probe = "lightning.callbacks.bn_probe"
    status = main([
        "-b", str(configs / "finetune_flux2_vae.yaml"), str(configs / "autoencoder_kl_f8_folder.yaml"),
        "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test", "--export", "diffusers",
        f"model.params.ckpt_path={tmp_path / 'flux2-vae'}",
        "model.params.lossconfig.params.perceptual_backbone=random",
        "model.params.lossconfig.params.disc_start=2", "model.params.lossconfig.params.disc_ndf=8",
        f"data.params.train_dir={photos}", f"data.params.val_dir={photos}", "data.params.size=32",
        "data.params.min_size=32", "data.params.batch_size=2", "data.params.num_workers=0",
        "lightning.max_iterations=4", "lightning.trainer.enable_progress_bar=false",
        f"{probe}.target=tests.interop.test_flux2.BatchNormModeProbe",
        f"{probe}.params.out={tmp_path / 'modes.json'}",
    ])  # fmt: skip
    assert status == 0
    modes = json.loads((tmp_path / "modes.json").read_text())
    assert len(modes) >= 4 and all(m == [True, False] for m in modes)

    run = only_run_dir(tmp_path / "logs")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    theirs = {f"bn.{k}": v for k, v in source.bn.state_dict().items()}
    for prefix in ("", "ema."):  # the live network and the EMA copy that is exported
        for key, value in theirs.items():
            assert torch.equal(state[prefix + key], value), prefix + key
    assert torch.equal(state["encoder.conv_out.weight"], source.encoder.conv_out.weight.detach())
    assert torch.equal(state["quant_conv.weight"], source.quant_conv.weight.detach())
    assert not torch.equal(state["decoder.conv_out.weight"], source.decoder.conv_out.weight.detach())

    exported = AutoencoderKLFlux2.from_pretrained(run / "export" / "diffusers").eval()
    assert torch.equal(exported.bn.running_mean, source.bn.running_mean)
    assert torch.equal(exported.bn.running_var, source.bn.running_var)
    _assert_same_as_diffusers(InferenceVAE.from_pretrained(run / "export" / "diffusers"), exported)


def test_latent_stats_fill_a_new_flux2_vae_batch_norm(tmp_path, capsys) -> None:
    """klvae-latent-stats measures the patchified posterior means; klvae-export --batch-norm-stats writes them;
    FLUX.2's pipeline code then gives latents with mean 0 and variance 1 per channel on those images."""
    from klvae.evaluation.data import image_batches
    from klvae.evaluation.latent_stats import main as stats_main
    from klvae.interop.export import main as export_main

    _flux2_diffusers().save_pretrained(tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    stats_args = ["--data", str(tmp_path / "imgs"), "--resolution", "32", "--batch-size", "2"]
    assert stats_main([str(tmp_path / "vae"), *stats_args, "--out", str(tmp_path / "stats.json")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())["batch_norm"]
    assert stats["patch_size"] == [2, 2] and stats["statistic"] == "posterior means"
    assert len(stats["running_mean"]) == len(stats["running_var"]) == 4 * LATENT

    out = tmp_path / "filled"
    assert (
        export_main(
            [str(tmp_path / "vae"), "--out", str(out), "--batch-norm-stats", str(tmp_path / "stats.json")]
        )
        == 0
    )
    theirs = AutoencoderKLFlux2.from_pretrained(out).eval()
    latents = torch.cat(
        [flux2_pipeline_latents(theirs, x) for x, _ in image_batches(str(tmp_path / "imgs"), 32, 2)]
    )
    per_channel = latents.double().transpose(0, 1).reshape(4 * LATENT, -1)  # (128, images · 8 · 8)
    torch.testing.assert_close(
        per_channel.mean(1), torch.zeros(4 * LATENT, dtype=torch.double), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        per_channel.var(1), torch.ones(4 * LATENT, dtype=torch.double), rtol=0, atol=1e-3
    )

    # Factors do not apply to a BatchNorm VAE: one error line naming the flag and what to do.
    capsys.readouterr()
    assert (
        export_main(
            [
                str(tmp_path / "vae"),
                "--out",
                str(tmp_path / "x"),
                "--latent-stats",
                str(tmp_path / "stats.json"),
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("klvae-export: error")]
    assert len(errors) == 1 and "--latent-stats" in errors[0] and "--batch-norm-stats" in errors[0]


def test_wrong_uses_are_named(tmp_path) -> None:
    source = _flux2_diffusers()
    source.save_pretrained(tmp_path / "vae")
    weights = read_vae_weights(tmp_path / "vae")
    with pytest.raises(ValueError, match="normalises latents with its BatchNorm"):
        InferenceVAE.from_pretrained(tmp_path / "vae", scaling_factor=0.5)
    with pytest.raises(ValueError, match="not with scaling_factor=0.5"):
        write_vae(weights, tmp_path / "out", scaling_factor=0.5)
    with pytest.raises(ValueError, match="running_var has 4 values; this VAE's BatchNorm has 128"):
        with_batch_norm_statistics(weights, [0.0] * 128, [1.0] * 4)
    # FLUX.2's own layout needs its whole shape; diffusers cannot hold an affine BatchNorm.
    plain = KLAutoencoder.from_ddconfig({**weights.network.ddconfig(), "latent_batch_norm": None}, LATENT)
    with pytest.raises(ValueError, match="FLUX.2's AutoEncoder always has"):
        write_vae(VAEWeights(plain.state_dict(), plain.network, "x"), tmp_path / "ae.safetensors", "flux2-ae")
    with pytest.raises(ValueError, match="no latent BatchNorm to fill"):
        with_batch_norm_statistics(VAEWeights(plain.state_dict(), plain.network, "x"), [], [])
    affine = KLAutoencoder.from_ddconfig(
        {**weights.network.ddconfig(), "latent_batch_norm": {"affine": True}}, LATENT
    )
    with pytest.raises(ValueError, match="affine=true"):
        write_vae(VAEWeights(affine.state_dict(), affine.network, "x"), tmp_path / "affine")
    # A config.json that promises a BatchNorm its weights lack is a damaged folder.
    plain_weights = VAEWeights(plain.state_dict(), plain.network, "x")
    folder = write_vae(plain_weights, tmp_path / "plain", scaling_factor=1.0)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        _class_name="AutoencoderKLFlux2", batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=[2, 2]
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="its config says latent_batch_norm=.* but its tensors have latent_batch_norm=None"
    ):
        read_vae_weights(folder)
    with pytest.raises(ValueError, match="decoder_block_out_channels"):
        network_from_diffusers_config(
            {"_class_name": "AutoencoderKLFlux2", "decoder_block_out_channels": [64] * 4}
        )


def test_warm_start_refuses_to_drop_or_invent_the_batch_norm(tmp_path, tiny_lossconfig) -> None:
    # An explicit ddconfig without latent_batch_norm would silently drop FLUX.2's statistics (and one with it,
    # on a file without, would train on 0/1): both are one error that shows the file's network.
    from klvae.models.autoencoder import AutoencoderKL

    _flux2_diffusers().save_pretrained(tmp_path / "vae")
    ddconfig = read_vae_weights(tmp_path / "vae").network.ddconfig()
    without = {**ddconfig, "latent_batch_norm": None}
    with pytest.raises(ValueError, match="holds a different network.*latent_batch_norm"):
        AutoencoderKL(without, tiny_lossconfig, embed_dim=LATENT, ckpt_path=str(tmp_path / "vae"))
    model = AutoencoderKL(ddconfig, tiny_lossconfig, embed_dim=LATENT, ckpt_path=str(tmp_path / "vae"))
    assert model.network.latent_batch_norm == LatentBatchNormConfig()
