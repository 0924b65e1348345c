"""CUDA-only checks (skipped without a GPU): the default GPU path (bf16, torch.compile with inductor, fused
Adam) trains across disc_start in both schedules, keeps fp32 master weights, and never syncs the host
inside the training step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL
from tests.models.test_autoencoder import loader


class NoSyncAutoencoderKL(AutoencoderKL):
    """Raises on any host-device synchronisation inside training_step (after the first two batches)."""

    def training_step(self, batch, batch_idx):
        if batch_idx < 2:  # compilation, EMA's one read of its counter
            return super().training_step(batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().training_step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_bf16_compiled_training_on_cuda_across_disc_start(tiny_ddconfig, tiny_lossconfig, schedule):
    torch._dynamo.reset()
    tiny_lossconfig["params"]["disc_start"] = 1
    model = NoSyncAutoencoderKL(
        tiny_ddconfig, tiny_lossconfig, embed_dim=4, learning_rate=1e-4, update_schedule=schedule,
        ema_decay=0.999, gradient_clip_val=1.0,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, limit_train_batches=6,
        limit_val_batches=2, val_check_interval=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model, loader(), loader(8))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
    counts = model.graph_counts()
    assert set(counts) == {"encoder", "decoder", "lpips", "discriminator"}
    assert all(n <= 2 for n in counts.values()), counts
    torch._dynamo.reset()
