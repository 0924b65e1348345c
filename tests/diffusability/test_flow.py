"""The rectified-flow conventions against diffusers' scheduler, the DiT sizes, and exact resume of training."""

from __future__ import annotations

import math

import pytest
import torch

from klvae.diffusability.encode import encode_to_shards
from klvae.diffusability.flow import build_dit, null_labels, sample_latents, validation_loss
from klvae.diffusability.protocol import PRESETS, protocol_for
from klvae.diffusability.train import CHECKPOINT_NAME, train_dit
from klvae.errors import ConfigError

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, batch_size=4, warmup_steps=2,
            val_every=5, checkpoint_every=5, val_fraction=0.0, val_max_latents=4)  # fmt: skip


class _ExactVelocity(torch.nn.Module):
    """The true velocity field of a point mass at ``c``: x_σ = (1-σ)c + σε ⇒ v = ε - c = (x - c)/σ."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, timestep, class_labels):  # noqa: ANN001, ANN201
        sigma = (timestep / 1000.0).view(-1, 1, 1, 1)
        return type("Out", (), {"sample": (x - self.c) / sigma})()


def test_euler_sampler_with_the_exact_velocity_lands_on_the_data() -> None:
    # Fails if our σ, timestep scale or velocity sign disagree with FlowMatchEulerDiscreteScheduler's.
    c = torch.randn(1, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = sample_latents(
        _ExactVelocity(c), 3, (4, 4, 4), torch.zeros(3, dtype=torch.long), 10, g, 2, torch.device("cpu")
    )
    torch.testing.assert_close(out, c.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    x, noise = c.expand(2, -1, -1, -1), torch.randn(2, 4, 4, 4)
    assert max(validation_loss(_ExactVelocity(c), x, torch.zeros(2), noise, (0.2, 0.8), 2).values()) < 1e-10


def test_presets_are_dit_s2_and_dit_b2() -> None:
    for name, width in (("small", 384), ("base", 768)):
        p = PRESETS[name]
        assert (p.num_layers, p.num_attention_heads * p.attention_head_dim, p.patch_size) == (12, width, 2)
    model = build_dit(protocol_for("smoke"), (4, 8, 8), None)
    assert type(model).__name__ == "DiTTransformer2DModel"
    labels = null_labels(model, 3, torch.device("cpu"))
    assert labels.tolist() == [1, 1, 1]  # the null (guidance) row of a one-"class" table
    with pytest.raises(ConfigError, match="unknown protocol field"):
        protocol_for("smoke", depth=3)
    with pytest.raises(ConfigError, match="--preset"):
        protocol_for("huge")


def test_training_resumes_exactly_after_an_interruption(tmp_path, photo_dir, vae_f2, monkeypatch) -> None:
    latents = tmp_path / "lat"
    encode_to_shards(
        str(vae_f2), str(photo_dir), latents, resolution=32, flip=True, num_workers=0, progress=False
    )
    protocol = protocol_for("smoke", steps=10, **TINY)
    whole = train_dit(latents, protocol, tmp_path / "whole", progress=False)

    import klvae.diffusability.train as train_module

    calls = {"n": 0}
    real_loss = train_module.flow_loss

    def dies_at_step_8(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # killed after the step-5 checkpoint
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "flow_loss", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_dit(latents, protocol, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_module, "flow_loss", real_loss)
    assert (tmp_path / "resumed" / CHECKPOINT_NAME).is_file()
    resumed = train_dit(latents, protocol, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from == 5
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [p["loss"] for p in resumed.curve] == [p["loss"] for p in whole.curve]
    with pytest.raises(ConfigError, match="another protocol"):
        train_dit(latents, protocol_for("smoke", steps=12, **TINY), tmp_path / "resumed", progress=False)


def test_compiled_bf16_training_follows_eager_fp32(tmp_path, photo_dir, vae_f2) -> None:
    # The GPU path (torch.compile + bf16 autocast) on CPU; aot_eager stands in for inductor (same graph capture).
    latents = tmp_path / "lat"
    encode_to_shards(str(vae_f2), str(photo_dir), latents, resolution=32, num_workers=0, progress=False)
    protocol = protocol_for("smoke", steps=5, **TINY)
    eager = train_dit(latents, protocol, tmp_path / "eager", progress=False)
    compiled = train_dit(
        latents, protocol, tmp_path / "compiled", precision="bf16", compile="aot_eager", progress=False
    )
    (a,), (b,) = ([p["train_loss"] for p in run.curve] for run in (eager, compiled))
    assert math.isfinite(b) and abs(a - b) < 0.05 * a
