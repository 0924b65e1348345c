"""The format registry (klvae.interop.formats): every format is detected, read strictly and written back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from klvae.interop.formats import FORMATS, VAEWeights, load_vae, read_vae_weights, write_vae
from klvae.interop.keys import ldm_to_diffusers
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KLAutoencoder
from tests.conftest import TINY_LOSSCONFIG, tiny_ddconfig_dict
from tests.interop.helpers import diffusers_from, randomized

TINY = tiny_ddconfig_dict(levels=2)  # f = 2, widths 8/16 (diffusers block_out_channels [8, 16])
# FLUX.1-shaped (16 channels, no quant convs) with widths FLUX's hard-coded 32 GroupNorm groups divide.
FLUX_TINY = {**TINY, "ch": 32, "z_channels": 16, "norm_num_groups": 32}


FORMAT_OF = {
    "lightning_sd": "ldm-ckpt",
    "bare": "ldm-ckpt",
    "safetensors_ldm": "ldm-safetensors",
    "safetensors_diffusers": "diffusers",
    "folder": "diffusers",
}


@pytest.mark.parametrize(
    "kind", ["lightning_sd", "bare", "safetensors_ldm", "safetensors_diffusers", "folder"]
)
def test_load_vae_from_every_layout(tmp_path, kind: str) -> None:
    ours = randomized(KLAutoencoder.from_ddconfig(TINY, 4))
    state = ours.state_dict()
    if kind == "lightning_sd":  # a full SD-style checkpoint: first_stage_model. plus unrelated keys
        path = tmp_path / "sd.ckpt"
        sd = {"first_stage_model." + k: v for k, v in state.items()}
        torch.save({"state_dict": {**sd, "model.diffusion_model.x": torch.zeros(2)}, "global_step": 3}, path)
    elif kind == "bare":
        path = tmp_path / "vae.pth"
        torch.save({**state, "loss.logvar": torch.zeros(())}, path)
    elif kind == "safetensors_ldm":
        path = tmp_path / "vae.safetensors"
        save_file(state, str(path))
    elif kind == "safetensors_diffusers":
        path = tmp_path / "diff.safetensors"
        save_file({k: v.contiguous() for k, v in ldm_to_diffusers(state).items()}, str(path))
    else:
        path = tmp_path / "pipeline"
        diffusers_from(TINY, state).save_pretrained(path / "vae")
    weights = read_vae_weights(path, ddconfig=None if kind == "folder" else TINY)
    assert weights.source_format == FORMAT_OF[kind]
    loaded = load_vae(path, ddconfig=None if kind == "folder" else TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # LDM's training checkpoints carry the loss's tensors (discriminator, logvar) for warm starts.
    assert set(weights.loss_state_dict) == ({"loss.logvar"} if kind == "bare" else set())
    if kind == "folder":
        assert weights.scaling_factor == 0.5
        assert json.loads((path / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path) -> None:
    state = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys.*decoder\.conv_out\.bias.*unexpected keys.*decoder\.extra\.weight"
    ):
        load_vae(path, ddconfig=TINY)
    wrong = {**TINY, "ch": 16, "norm_num_groups": 4}
    torch.save(KLAutoencoder.from_ddconfig(TINY, 4).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_vae(path, ddconfig=wrong)


def test_unsafe_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": KLAutoencoder.from_ddconfig(TINY, 4).state_dict(), "obj": torch.nn.ReLU()}, path
    )
    with pytest.raises(ValueError, match="weights_only"):
        load_vae(path, ddconfig=TINY)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "absent.ckpt")


def test_flux_ae_safetensors_layout_reads_from_tensors_alone(tmp_path) -> None:
    # FLUX.1's ae.safetensors: LDM names, no quant convs, no metadata; 16 channels.
    ours = randomized(
        KLAutoencoder.from_ddconfig(FLUX_TINY, 16, use_quant_conv=False, use_post_quant_conv=False)
    )
    path = tmp_path / "ae.safetensors"
    save_file(ours.state_dict(), str(path))
    weights = read_vae_weights(path)
    network = weights.network
    assert weights.source_format == "ldm-safetensors" and weights.scaling_factor is None
    assert (network.z_channels, network.embed_dim, network.use_quant_conv, network.use_post_quant_conv) == (
        16, 16, False, False,
    )  # fmt: skip
    assert set(weights.state_dict) == set(ours.state_dict())
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in weights.state_dict)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_vae(path).encode(x).mean, ours.encode(x).mean, rtol=0, atol=0)


def test_klvae_run_prefers_ema_weights(tmp_path) -> None:
    live = KLAutoencoder.from_ddconfig(TINY, 4).state_dict()
    ema = {k: v + 1 for k, v in live.items()}
    hparams = {"ddconfig": TINY, "embed_dim": 4}
    path = tmp_path / "last.ckpt"
    state = {**live, **{"ema." + k: v for k, v in ema.items()}, "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "klvae": {"iteration": 3}}, path)
    weights = read_vae_weights(path)
    assert weights.source_format == "klvae-run" and weights.used_ema and weights.network.ddconfig() == TINY
    assert torch.equal(weights.state_dict["decoder.conv_out.bias"], ema["decoder.conv_out.bias"])
    assert set(weights.loss_state_dict) == {"loss.logvar"}
    assert not read_vae_weights(path, use_ema=False).used_ema
    torch.save({"state_dict": live, "hyper_parameters": hparams, "klvae": {}}, path)
    with pytest.raises(ValueError, match="no EMA weights"):
        read_vae_weights(path, use_ema=True)
    # A run without EMA (and an older one without the "klvae" entry) is still recognised by its arguments:
    # its recorded network is used, which shapes alone could not give (4 GroupNorm groups).
    torch.save({"state_dict": live, "hyper_parameters": {**hparams, "lossconfig": {}}}, path)
    weights = read_vae_weights(path)
    assert weights.source_format == "klvae-run" and weights.network.norm_num_groups == 4


OUT_NAME = {"diffusers": "vae", "ldm-safetensors": "vae.safetensors", "ldm-ckpt": "vae.ckpt",
            "flux2-ae": "ae.safetensors"}  # fmt: skip
# (quant convs, FLUX.2's latent BatchNorm): kl-f8, SD3/FLUX.1, FLUX.2. flux2-ae holds only FLUX.2's shape.
SHAPES = {"kl-f8": (True, False), "no-quant-convs": (False, False), "flux2": (True, True)}


@pytest.mark.parametrize(
    ("name", "shape"),
    [(n, s) for n, f in FORMATS.items() if f.writable for s in SHAPES if n != "flux2-ae" or s == "flux2"],
)
def test_every_writable_format_reads_back_exactly(tmp_path, name: str, shape: str) -> None:
    quant_convs, batch_norm = SHAPES[shape]
    ddconfig = {**TINY, "z_channels": 4, "latent_batch_norm": {} if batch_norm else None}
    model = randomized(KLAutoencoder.from_ddconfig(ddconfig, 4, quant_convs, quant_convs))
    if batch_norm:  # statistics that are not the defaults, so that a lost one shows
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    weights = VAEWeights(model.state_dict(), model.network, "ldm-ckpt")
    out = tmp_path / OUT_NAME[name]
    factors = (None, None) if batch_norm else (0.25, 0.125)  # a latent BatchNorm normalises instead
    assert (
        write_vae(weights, out, name if name == "flux2-ae" else None, *factors) == out
    )  # else from the name
    back = read_vae_weights(out)  # no ddconfig: the file records its network (norm_num_groups 4)
    assert back.source_format == name and back.network == model.network
    assert (back.scaling_factor, back.shift_factor) == factors
    assert set(back.state_dict) == set(weights.state_dict)
    assert all(torch.equal(back.state_dict[k], v) for k, v in weights.state_dict.items())
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temp files


def test_write_errors_name_the_problem(tmp_path) -> None:
    model = KLAutoencoder.from_ddconfig(TINY, 4)
    weights = VAEWeights(model.state_dict(), model.network, "ldm-ckpt")
    with pytest.raises(ValueError, match="writable formats"):
        write_vae(weights, tmp_path / "x.ckpt", "klvae-run")
    with pytest.raises(ValueError, match=r"\.safetensors or \.ckpt"):
        write_vae(weights, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="scaling_factor"):
        write_vae(weights, tmp_path / "folder")
    with pytest.raises(ValueError, match=r"ldm-ckpt file is named"):
        write_vae(weights, tmp_path / "x.safetensors", "ldm-ckpt")


def test_unknown_files_and_contradicting_records_are_refused(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(1)}, str(path))
    with pytest.raises(
        ValueError, match=r"unrecognised VAE file.*diffusers.*klvae-run.*ldm-safetensors.*ldm-ckpt"
    ):
        read_vae_weights(path)
    # config.json says use_quant_conv but the weights have none: a damaged folder, named.
    flux = KLAutoencoder.from_ddconfig(FLUX_TINY, 16, use_quant_conv=False, use_post_quant_conv=False)
    weights = VAEWeights(flux.state_dict(), flux.network, "ldm-ckpt")
    folder = write_vae(weights, tmp_path / "vae", scaling_factor=1.0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_quant_conv": True}))
    with pytest.raises(ValueError, match="use_quant_conv=True but its tensors have use_quant_conv=False"):
        read_vae_weights(folder)
    with pytest.raises(FileNotFoundError, match="without config.json"):
        (tmp_path / "empty").mkdir()
        read_vae_weights(tmp_path / "empty")


@pytest.mark.parametrize("name", ["klvae-run", *(n for n, f in FORMATS.items() if f.writable)])
def test_warm_start_ckpt_path_accepts_every_format(tmp_path, name: str) -> None:
    from klvae.models.autoencoder import AutoencoderKL

    flux2 = name == "flux2-ae"  # FLUX.2's own layout holds only its shape: quant convs and latent BatchNorm
    source = randomized(
        AutoencoderKL({**TINY, "latent_batch_norm": {} if flux2 else None}, TINY_LOSSCONFIG, 4)
    )
    if flux2:
        source.bn.running_mean.normal_()
    if name == "klvae-run":
        path = tmp_path / "last.ckpt"
        torch.save(
            {"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams), "klvae": {}}, path
        )
    else:
        weights = VAEWeights(KLAutoencoder(source.network).state_dict(), source.network, "ldm-ckpt")
        weights.state_dict.update({k: v for k, v in source.state_dict().items() if k in weights.state_dict})
        path = write_vae(weights, tmp_path / OUT_NAME[name], name, scaling_factor=None if flux2 else 0.5)
    # ddconfig null: the network comes from the file, whatever its format.
    model = AutoencoderKL(None, TINY_LOSSCONFIG, embed_dim=4, ckpt_path=str(path))
    assert model.network == source.network
    ours, theirs = model.state_dict(), source.state_dict()
    for key in (
        k for k in theirs if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn."))
    ):
        assert torch.equal(ours[key], theirs[key]), key
    if name == "klvae-run":  # a run checkpoint also carries the discriminator on
        assert torch.equal(
            ours["loss.discriminator.main.0.weight"], theirs["loss.discriminator.main.0.weight"]
        )


def test_identity_quant_convs_make_an_sd3_flux_vae_loadable_by_ldm_code_exactly(tmp_path) -> None:
    from klvae.interop.formats import with_identity_quant_convs

    flux = randomized(
        KLAutoencoder.from_ddconfig(FLUX_TINY, 16, use_quant_conv=False, use_post_quant_conv=False)
    )
    weights = with_identity_quant_convs(VAEWeights(flux.state_dict(), flux.network, "ldm-safetensors"))
    assert weights.network.use_quant_conv and weights.network.use_post_quant_conv
    assert weights.state_dict["quant_conv.weight"].shape == (32, 32, 1, 1)  # 2 · embed_dim moments
    # Written and read back, it is a network with (identity) quant convs that computes the same thing.
    back = load_vae(write_vae(weights, tmp_path / "vae.ckpt"))
    assert back.network.use_quant_conv and len(back.state_dict()) == len(flux.state_dict()) + 4
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x).mean, flux.encode(x).mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(back.encode(x).logvar, flux.encode(x).logvar, rtol=0, atol=1e-6)
        z = flux.encode(x).mean
        torch.testing.assert_close(back.decode(z), flux.decode(z), rtol=0, atol=1e-6)
    kl_f8 = VAEWeights(
        KLAutoencoder.from_ddconfig(TINY, 4).state_dict(), NetworkConfig.from_params(TINY, 4), "x"
    )
    assert with_identity_quant_convs(kl_f8) is kl_f8  # nothing to add
