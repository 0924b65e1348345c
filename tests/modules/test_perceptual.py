"""Offline LPIPS construction: local files only, clear errors, explicit random backbone."""

from __future__ import annotations

import logging

import lpips
import pytest
import torch
import torchvision

from klvae.modules.perceptual import load_lpips, lpips_distance, torchvision_vgg16_to_lpips


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KLVAE_CACHE", str(tmp_path / "klvae"))
    return tmp_path


@pytest.fixture(scope="module")
def vgg_state():
    torch.manual_seed(1)
    with torch.device("meta"):  # shapes only: initialising VGG16's classifier takes seconds
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    return {k: torch.randn(s) * 0.05 for k, s in shapes.items() if k.startswith("features.")}


def trunk_equal(model, vgg_state) -> bool:
    converted = torchvision_vgg16_to_lpips(vgg_state)
    own = model.state_dict()
    return len(converted) == 26 and all(torch.equal(own[k], v) for k, v in converted.items())


def test_missing_imagenet_weights_error_names_files_and_remedies(empty_caches):
    with pytest.raises(FileNotFoundError) as info:
        load_lpips("imagenet")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "lpips_vgg.pth" in message
    assert "klvae-fetch-weights" in message and "perceptual_backbone" in message


def test_imagenet_reads_torchvision_hub_cache(empty_caches, vgg_state):
    hub = empty_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(vgg_state, hub / "vgg16-397923af.pth")
    model = load_lpips("imagenet")
    assert trunk_equal(model, vgg_state)


def test_explicit_path_to_full_lpips_state_dict(tmp_path, vgg_state):
    source = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    source.load_state_dict(torchvision_vgg16_to_lpips(vgg_state), strict=False)
    with torch.no_grad():
        source.lin0.model[1].weight.mul_(2.0)  # make the heads distinguishable from the packaged ones
    torch.save(source.state_dict(), tmp_path / "full.pth")
    model = load_lpips(str(tmp_path / "full.pth"))
    assert trunk_equal(model, vgg_state)
    torch.testing.assert_close(model.lin0.model[1].weight, source.lin0.model[1].weight)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model(x, y), source.eval()(x, y))


def test_file_without_trunk_is_rejected(tmp_path):
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing 26 trunk tensors"):
        load_lpips(str(tmp_path / "bad.pth"))


def test_nonexistent_path_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_lpips(str(tmp_path / "nope.pth"))


def test_random_backbone_is_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="klvae.modules.perceptual"):
        model = load_lpips("random")
    assert "RANDOMLY INITIALISED" in caplog.text
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_packaged_heads_and_scaling_constants_survive_fast_construction():
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    model = load_lpips("random")
    for key, value in reference.state_dict().items():
        if not key.startswith("net."):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)


# LPIPS assembled from its pieces, with the target outside autograd
@pytest.fixture(scope="module")
def lpips_model():
    return load_lpips("random")


def test_lpips_distance_equals_lpips_forward_value_and_gradient(lpips_model):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    ref = lpips_model(x, x_hat)
    (g_ref,) = torch.autograd.grad(ref.sum(), x_hat)
    out = lpips_distance(lpips_model, x, x_hat)
    (g_out,) = torch.autograd.grad(out.sum(), x_hat)
    assert out.shape == ref.shape == (2, 1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-8)


def test_lpips_distance_keeps_no_graph_for_the_target(lpips_model):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    x_hat = torch.rand(1, 3, 32, 32).requires_grad_(True)
    lpips_distance(lpips_model, x, x_hat).sum().backward()
    assert x.grad is None and x_hat.grad is not None
