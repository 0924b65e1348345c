"""DINO-feature discriminator: logits, where gradients go, per-sample heads, R1's double backward, compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from klvae.errors import ConfigError
from klvae.modules.backbones import double_backward_attention
from klvae.modules.dino_discriminator import DinoDiscriminator, TokenNorm
from tests.conftest import tiny_backbone_config

# A /16 ViT at 64²: a 4×4 patch grid, 16 tokens per head.
BLOCKS = (1, 3, -1)


def disc(**params) -> DinoDiscriminator:
    backbone = tiny_backbone_config("vit_small_patch16_224.dino", **params.pop("backbone", {}))
    return DinoDiscriminator(backbone=backbone, **{"blocks": BLOCKS, "kernel_size": 3, **params})


def images(b: int = 3, side: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, side, side) * 2 - 1


def test_logits_are_one_per_token_per_head():
    d = disc()
    assert d.blocks == [1, 3, 3]  # -1 is the last block: with block 3 listed too it gets two heads
    assert d(images()).shape == (3, 3 * 16)
    assert d(images(2, 80)).shape == (2, 3 * 16)  # resized to the backbone's 64² whatever the input
    assert disc(blocks=(0,))(images()).dtype == torch.float32


def test_only_the_heads_are_parameters_and_state():
    d = disc()
    names = [n for n, _ in d.named_parameters()]
    assert names and all(n.startswith("heads.") for n in names)
    assert all(k.startswith("heads.") for k in d.state_dict())  # no backbone tensors in checkpoints
    other = disc()
    other.load_state_dict(d.state_dict(), strict=True)
    d.eval(), other.eval()
    x = images()
    torch.testing.assert_close(other(x), d(x))


def test_generator_gradient_reaches_the_image_through_the_frozen_vit():
    d = disc()
    fake = images().requires_grad_(True)
    (-d(fake).mean()).backward()  # the hinge generator loss
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.backbone._vit.parameters())


def test_discriminator_step_trains_every_head_and_nothing_else():
    d = disc()
    real, fake = images(), images()
    loss = F.relu(1.0 - d(real)).mean() + F.relu(1.0 + d(fake)).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads[-1].parameters())
    assert all(p.grad is None for p in d.backbone._vit.parameters())


def test_an_images_logits_do_not_depend_on_the_rest_of_the_batch():
    # Per-sample head normalisation: nothing to synchronise across DDP ranks, real and fake never mix.
    d = disc().eval()  # eval: the spectral norms' power iteration does not advance between the calls
    x, others = images(1), images(4)
    alone = d(x)
    together = d(torch.cat([x, others]))[:1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_token_norm_normalises_each_sample_and_channel_over_tokens():
    norm = TokenNorm(6)
    x = torch.randn(2, 6, 10) * 3 + 1
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-6))


def test_r1_double_backward_works_eagerly_with_math_attention():
    d = disc()
    real = images().requires_grad_(True)
    with double_backward_attention():
        logits = d(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    r1 = grad.square().sum(dim=(1, 2, 3)).mean()
    r1.backward()
    assert torch.isfinite(r1) and r1 > 0
    grads = {n: p.grad for n, p in d.named_parameters()}
    # ∂D/∂x does not depend on the heads' output biases; every other head parameter gets a gradient.
    output_biases = {f"heads.{i}.2.bias" for i in range(len(BLOCKS))}
    assert {n for n, g in grads.items() if g is None} == output_biases
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert all(grads[f"heads.{i}.0.0.parametrizations.weight.original"].abs().sum() > 0 for i in range(3))


def test_compiles_as_one_region_with_aot_eager_and_r1_uses_the_eager_module():
    # Train mode: the compiled region also advances the spectral norms' power iteration (buffer updates).
    d = disc(blocks=(0, -1), backbone={"model_kwargs": {"depth": 2}})
    twin = copy.deepcopy(d)
    x = images(2).requires_grad_(True)
    expected = twin(x)
    (expected_grad,) = torch.autograd.grad(expected.mean(), x)
    compiled = torch.compile(d, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.mean(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
    for (name, ours), theirs in zip(d.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)  # _u, _v advanced the same way
    # The compiled region has no double backward; the same module run eagerly (shared heads) has.
    real = images(2).requires_grad_(True)
    with double_backward_attention():
        (g,) = torch.autograd.grad(d(real).sum(), real, create_graph=True)
    g.square().sum().backward()
    assert all(p.grad is not None for n, p in d.named_parameters() if not n.endswith(".2.bias"))


def test_bf16_autocast_gives_finite_fp32_logits():
    d = disc()
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = d(x)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="odd"):
        disc(kernel_size=4)
    with pytest.raises(ConfigError, match="has 4 blocks"):
        disc(blocks=(2, 5, 8, 11))
    with pytest.raises(ConfigError, match="at least one"):
        disc(blocks=())


def test_builds_from_a_yaml_block():
    from omegaconf import OmegaConf

    from klvae.util import instantiate_from_config

    yaml = f"""
    target: klvae.modules.dino_discriminator.DinoDiscriminator
    params:
      backbone: {tiny_backbone_config("vit_small_patch16_224.dino")}
      blocks: [1, 3, -1]
      kernel_size: 9
    """
    d = instantiate_from_config(OmegaConf.create(yaml))
    assert isinstance(d, DinoDiscriminator) and len(d.heads) == 3 and d.backbone.patch_size == 16
    with pytest.raises(ConfigError, match="does not build a FrozenViT"):
        DinoDiscriminator(backbone={"target": "torch.nn.Identity"})
