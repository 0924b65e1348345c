"""CUDA-only checks (skipped without a GPU): bf16 autocast training keeps fp32 master weights."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL
from tests.models.test_autoencoder import loader


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["alternate", "every_batch"])
def test_bf16_mixed_training_on_cuda_keeps_fp32_weights_and_finite_losses(
    tiny_ddconfig, tiny_lossconfig, schedule
):
    tiny_lossconfig["params"]["disc_start"] = 1
    model = AutoencoderKL(
        tiny_ddconfig, tiny_lossconfig, embed_dim=4, learning_rate=1e-4, update_schedule=schedule
    )
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, loader())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
