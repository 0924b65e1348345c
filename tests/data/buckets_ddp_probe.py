"""Two-rank gloo training on bucketed, phased folder batches for tests/data/test_folder_batches.py.

    python tests/data/buckets_ddp_probe.py IMAGE_DIR OUT_DIR

Lightning relaunches this script for rank 1. Each rank writes OUT_DIR/rank{r}.json (per training batch:
its shape, keys and phase, as the model received it) and OUT_DIR/rank{r}.pt (its final state dict).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from klvae.data import DataStatsCallback, ImageFolderDataModule  # noqa: E402
from klvae.models.autoencoder import AutoencoderKL  # noqa: E402
from klvae.training.ddp import PerOptimizerDDPStrategy  # noqa: E402
from tests.conftest import TINY_DDCONFIG, TINY_LOSSCONFIG  # noqa: E402


class RecordBatches(pl.Callback):
    """What each training step gets: (B, 3, H, W), sample keys, and the phase (logged by DataStatsCallback)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append({"shape": list(batch["image"].shape), "keys": batch["__key__"]})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches[-1]["phase"] = int(trainer.callback_metrics["data/phase"])


def main(images: Path, out: Path) -> None:
    lossconfig = copy.deepcopy(TINY_LOSSCONFIG)
    lossconfig["params"]["disc_start"] = 2
    model = AutoencoderKL(TINY_DDCONFIG, lossconfig, embed_dim=4, learning_rate=1e-3)
    data = ImageFolderDataModule(
        str(images), size=32, batch_size=2, seed=5, random_flip=True, buckets={"step": 8, "max_aspect": 2.0},
        phases=[{"iterations": 3, "size": 32}, {"size": 48, "batch_size": 3}],
    )  # fmt: skip
    record = RecordBatches()
    strategy = PerOptimizerDDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=-1, max_epochs=1,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[DataStatsCallback(), record])  # fmt: skip
    trainer.fit(model, datamodule=data)
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps(record.batches))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
