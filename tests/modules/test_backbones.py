"""Frozen timm ViTs: offline weights, explicit random init, frozen and invisible to parents, compile, bf16."""

from __future__ import annotations

import copy
import logging
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from klvae.errors import ConfigError
from klvae.modules.backbones import FrozenViT, hf_hub_cache
from tests.conftest import tiny_backbone_dict

DINOV2 = "vit_small_patch14_dinov2.lvd142m"


def tiny(**overrides) -> FrozenViT:
    return FrozenViT(**tiny_backbone_dict(**overrides))


def images(b: int = 2, h: int = 56, w: int = 56) -> torch.Tensor:
    return torch.rand(b, 3, h, w) * 2 - 1


def tiny_timm_state(seed: int) -> dict[str, torch.Tensor]:
    """Weights of the tiny DINOv2 layout, distinguishable from the seeded random init."""
    kwargs = tiny_backbone_dict()["model_kwargs"]
    torch.manual_seed(seed)
    model = timm.create_model(DINOV2, pretrained=False, num_classes=0, img_size=56, **kwargs)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def assert_weights(backbone: FrozenViT, state: dict[str, torch.Tensor]) -> None:
    own = backbone._vit.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(own[k], v, msg=k)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_missing_weights_is_one_error_line_naming_cache_and_fetch_command(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        FrozenViT("vit_large_patch14_dinov2.lvd142m")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "hub") in message and "timm/vit_large_patch14_dinov2.lvd142m" in message
    assert "timm.create_model('vit_large_patch14_dinov2.lvd142m', pretrained=True)" in message
    assert "path:" in message and "allow_random_backbone" in message


def test_hub_cache_follows_hf_home_and_hf_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_hub_cache() == tmp_path / "elsewhere"


def test_weights_come_from_the_hub_cache_without_network(tmp_path, monkeypatch, no_network):
    # The layout huggingface_hub (and so timm) writes: refs/main names the snapshot holding the files.
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / f"models--timm--{DINOV2}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    state = tiny_timm_state(seed=7)
    save_file(state, str(snapshot / "model.safetensors"))

    backbone = FrozenViT(**tiny_backbone_dict(allow_random_backbone=False))
    assert backbone.weights_source == str(snapshot / "model.safetensors")
    assert_weights(backbone, state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_come_from_a_local_path(tmp_path, suffix):
    state = tiny_timm_state(seed=3)
    path = tmp_path / f"dinov2{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    backbone = FrozenViT(**tiny_backbone_dict(path=str(path), allow_random_backbone=False))
    assert_weights(backbone, state)


def test_position_embeddings_are_resampled_to_image_size(tmp_path):
    # Real DINOv2 weights carry a 37×37 grid (518²); built at 224² they must come out 16×16, resampled once
    # by timm's own checkpoint filter. Here: a 4×4 grid (56²) loaded at 28² → 2×2.
    state = tiny_timm_state(seed=3)
    save_file(state, str(tmp_path / "w.safetensors"))
    backbone = FrozenViT(**tiny_backbone_dict(path=str(tmp_path / "w.safetensors"), image_size=28))
    assert state["pos_embed"].shape[1] == 1 + 16 and backbone._vit.pos_embed.shape[1] == 1 + 4
    torch.testing.assert_close(backbone._vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert backbone(images()).shape == (2, 32, 2, 2)


def test_bad_weight_files_and_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenViT(DINOV2, path=str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not.a.vit": torch.zeros(3)}, str(wrong))
    with pytest.raises(ValueError, match="does not hold vit_small_patch14_dinov2.lvd142m weights"):
        FrozenViT(**tiny_backbone_dict(path=str(wrong)))
    with pytest.raises(ConfigError, match="not a timm model"):
        FrozenViT("vit_small_patch14_dinov3_typo", allow_random_backbone=True)
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        tiny(image_size=50)


def test_random_backbone_is_explicit_logged_and_always_the_same(caplog):
    with pytest.raises(FileNotFoundError):
        tiny(allow_random_backbone=False)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="klvae.modules.backbones"):
        first = tiny()
    assert "RANDOMLY INITIALISED" in caplog.text and first.weights_source == "random"
    assert torch.equal(torch.get_rng_state(), rng)  # building it leaves the caller's RNG stream alone
    torch.manual_seed(123)
    assert_weights(tiny(), first._vit.state_dict())  # every rank and every resume rebuilds the same ViT


def test_normalisation_comes_from_the_models_pretrained_cfg():
    dinov2, siglip = tiny(), tiny(model_name="vit_base_patch16_siglip_224.webli")
    for backbone, mean in ((dinov2, (0.485, 0.456, 0.406)), (siglip, (0.5, 0.5, 0.5))):
        at_mean = (torch.tensor(mean) * 2 - 1).view(1, 3, 1, 1).expand(1, 3, 8, 8)  # the mean, in [-1, 1]
        assert backbone.preprocess(at_mean).abs().max() < 1e-6
    x = images()
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(dinov2.preprocess(x) - dinov2.preprocess(torch.zeros_like(x)), x / 2 / std)
    # normalize_input: false feeds [-1, 1] unchanged, as VA-VAE's foundation_models.py does.
    assert torch.equal(tiny(normalize_input=False).preprocess(x), x)


def test_backbone_is_frozen_and_invisible_to_its_parent():
    backbone = tiny()
    parent = nn.Sequential(nn.Linear(2, 2), backbone)
    assert [n for n, _ in parent.named_parameters()] == ["0.weight", "0.bias"]
    assert list(parent.state_dict()) == ["0.weight", "0.bias"]  # no backbone tensors in checkpoints
    parent.load_state_dict(copy.deepcopy(parent.state_dict()), strict=True)
    parent.train()
    assert not backbone._vit.training and not any(p.requires_grad for p in backbone._vit.parameters())
    parent.to(torch.float64)  # .to() still reaches the frozen model
    assert backbone._vit.pos_embed.dtype == torch.float64 and backbone.input_scale.dtype == torch.float64
    assert "not in state_dict" in repr(parent)


def test_gradient_reaches_the_input_and_never_the_weights():
    backbone = tiny()
    x = images().requires_grad_(True)
    backbone(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone._vit.parameters())


def test_features_drop_prefix_tokens_and_blocks_come_in_the_asked_order():
    backbone = tiny(model_name="vit_small_patch14_reg4_dinov2.lvd142m")  # class token + 4 registers
    x = images()
    last = backbone(x)
    assert last.shape == (2, 32, 4, 4)
    tokens = backbone._vit.forward_features(backbone.preprocess(x))  # (B, 5 + 16, C), final norm applied
    assert tokens.shape[1] == 5 + 16
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), tokens[:, 5:])
    b2, b0, again, end = backbone.block_features(x, [2, 0, 2, -1])
    assert b2.shape == b0.shape == end.shape == (2, 32, 4, 4) and torch.equal(b2, again)
    torch.testing.assert_close(b0, backbone.block_features(x, [0])[0])
    assert not torch.allclose(end, last)  # block outputs are taken before the final norm
    with pytest.raises(ConfigError, match="has 4 blocks"):
        backbone.block_features(x, [4])


def test_image_size_none_keeps_the_aspect_ratio_on_a_patch_grid():
    backbone = tiny(image_size=None)
    assert backbone.grid_size(64, 100) == (5, 7)  # round(64/14), round(100/14)
    assert backbone(images(1, 64, 100)).shape == (1, 32, 5, 7)
    assert tiny().grid_size(64, 100) == (4, 4)  # image_size 56: resized to 56² whatever the input


def test_compiles_as_one_region_with_aot_eager():
    backbone = tiny(model_kwargs={"depth": 2})
    x = images(2, 64, 48).requires_grad_(True)
    expected = backbone(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    compiled = torch.compile(backbone, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_bf16_autocast_gives_finite_features_close_to_fp32():
    backbone = tiny()
    x = images()
    reference = backbone(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = backbone(x)
        blocks = backbone.block_features(x, [1, 3])
    assert torch.isfinite(features).all() and all(torch.isfinite(b).all() for b in blocks)
    assert (features.float() - reference).abs().max() < 0.05 * reference.abs().max()
