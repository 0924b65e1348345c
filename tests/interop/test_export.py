"""klvae run checkpoint (EMA) -> LDM file / diffusers folder, read back by klvae and by diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from klvae.interop.export import main
from klvae.interop.formats import load_vae, read_vae_weights
from klvae.models.autoencoder import AutoencoderKL
from tests.conftest import TINY_LOSSCONFIG, tiny_ddconfig_dict

TINY = tiny_ddconfig_dict(levels=2)  # f = 2, widths 8/16 (diffusers block_out_channels [8, 16])


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> tuple:
    """A real Lightning checkpoint of a tiny run with EMA whose EMA weights differ from the live ones."""
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=TINY, lossconfig=TINY_LOSSCONFIG, embed_dim=4, ema_decay=0.999)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False
    )
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_run_checkpoint_prefers_ema(run_checkpoint) -> None:
    path, model = run_checkpoint
    ema = read_vae_weights(path)
    live = read_vae_weights(path, use_ema=False)
    assert ema.used_ema and not live.used_ema and ema.network.ddconfig() == TINY
    key = "decoder.conv_out.weight"
    assert torch.equal(ema.state_dict[key], model.ema.decoder.conv_out.weight)
    assert torch.equal(live.state_dict[key], model.decoder.conv_out.weight)
    assert len(ema.state_dict) == len(model.ema.state_dict()) - 1  # all but ema.num_updates


def test_export_diffusers_folder_matches_klvae_outputs(run_checkpoint, tmp_path) -> None:
    path, model = run_checkpoint
    out = tmp_path / "vae"
    main([str(path), "--format", "diffusers", "--out", str(out), "--scaling-factor", "0.37"])
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == 0.37 and "shift_factor" not in config
    theirs = DiffusersAutoencoderKL.from_pretrained(out).eval()
    assert theirs.config.block_out_channels == [8, 16] and theirs.config.norm_num_groups == 4
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad(), model.ema_scope():
        mean = model.encode(x).mean
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(mean).sample, model.decode(mean), rtol=1e-4, atol=1e-4)
    # And klvae reads its own export back, with the scaling factor.
    weights = read_vae_weights(out)
    assert weights.source_format == "diffusers" and weights.scaling_factor == 0.37


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_export_ldm_file_loads_strictly(run_checkpoint, tmp_path, suffix: str) -> None:
    path, model = run_checkpoint
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"scaling_factor": 0.9, "shift_factor": 0.2}))
    out = tmp_path / f"vae{suffix}"
    main([str(path), "--format", "ldm", "--out", str(out), "--latent-stats", str(stats)])
    weights = read_vae_weights(out)
    assert weights.source_format == ("ldm-safetensors" if suffix == ".safetensors" else "ldm-ckpt")
    assert weights.network.ddconfig() == TINY
    assert (weights.scaling_factor, weights.shift_factor) == (0.9, 0.2)
    ema_state = {
        k[len("ema.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("ema.") and "num_updates" not in k
    }
    loaded = load_vae(out).state_dict()
    assert set(loaded) == set(ema_state) and all(torch.equal(loaded[k], ema_state[k]) for k in loaded)
    if suffix == ".ckpt":
        # What LDM's AutoencoderKL.init_from_ckpt does: torch.load(path)["state_dict"], then load_state_dict.
        sd = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
        fresh = AutoencoderKL(ddconfig=TINY, lossconfig=TINY_LOSSCONFIG, embed_dim=4)
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.startswith("loss.") for k in missing)


def test_export_diffusers_without_scaling_factor_fails_clearly(run_checkpoint, tmp_path, capsys) -> None:
    path, _ = run_checkpoint
    assert main([str(path), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]  # exactly one error line, no traceback
    assert (
        line.startswith("klvae-export: error: ") and "klvae-latent-stats" in line and "Traceback" not in err
    )


def test_python_m_export_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "klvae.interop.export", "--help"], capture_output=True, text=True, check=True
    )
    assert "--latent-stats" in result.stdout


def test_finetune_config_builds_a_frozen_encoder_ema_model(tmp_path) -> None:
    from omegaconf import OmegaConf

    from klvae.errors import ConfigError
    from klvae.util import instantiate_from_config, to_container

    config = OmegaConf.load("configs/finetune_sd_vae_decoder.yaml")
    with pytest.raises(ConfigError, match="model.params.ckpt_path"):
        to_container(config)  # ckpt_path: ??? must be given, and the error names its full key
    params = config.model.params
    assert params.train_decoder_only is True and params.ema_decay == 0.9999
    source = AutoencoderKL(ddconfig=TINY, lossconfig=TINY_LOSSCONFIG, embed_dim=4)
    sd = {"first_stage_model." + k: v for k, v in source.state_dict().items() if not k.startswith("loss.")}
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    params.ckpt_path = str(tmp_path / "sd.ckpt")
    params.ddconfig = TINY
    params.lossconfig.params.perceptual_backbone = "random"
    model = instantiate_from_config(to_container(config.model))
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert torch.equal(model.ema.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_a_new_format_is_one_registry_entry(run_checkpoint, tmp_path, monkeypatch) -> None:
    # What a newcomer adds for a new export format: one VAEFormat in FORMATS. klvae-export finds it by
    # --format and by the file name, with no other change.
    from klvae.interop import formats

    class HalfPrecision(formats.VAEFormat):
        name, description, writable, suffixes = (
            "ldm-fp16",
            "LDM layout in float16",
            True,
            (".fp16.ckpt", ".f16"),
        )

        def write(self, weights, out, scaling_factor, shift_factor, prefix=""):
            half = {k: v.half() for k, v in weights.state_dict.items()}
            return formats.save_torch_file(half, out)

    monkeypatch.setitem(formats.FORMATS, "ldm-fp16", HalfPrecision())
    path, _ = run_checkpoint
    assert main([str(path), "--format", "ldm-fp16", "--out", str(tmp_path / "a.fp16.ckpt")]) == 0
    assert main([str(path), "--out", str(tmp_path / "b.f16")]) == 0  # chosen from the suffix
    for name in ("a.fp16.ckpt", "b.f16"):
        state = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert state["decoder.conv_out.weight"].dtype == torch.float16
