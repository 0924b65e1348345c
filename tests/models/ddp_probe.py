"""Two-rank gloo training run for tests/models/test_ddp.py (Lightning relaunches this script per rank).

    python tests/models/ddp_probe.py OUT_DIR SCHEDULE

Each rank writes OUT_DIR/rank{r}.json (gradient elements all-reduced per batch, as seen by a spy on
torch.distributed.all_reduce, and per optimizer step, as the strategy counted them) and
OUT_DIR/rank{r}.pt (its final state dict).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from klvae.models.autoencoder import AutoencoderKL  # noqa: E402
from klvae.training.ddp import PerOptimizerDDPStrategy  # noqa: E402
from tests.conftest import TINY_DDCONFIG, TINY_LOSSCONFIG  # noqa: E402


class CountAllReduce(pl.Callback):
    """Elements passed to dist.all_reduce during each training batch (everything that goes on the wire)."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._original = dist.all_reduce

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.per_batch.append(0)

        def counting(tensor, *args, **kwargs):
            self.per_batch[-1] += tensor.numel()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        dist.all_reduce = self._original


def main(out: Path, schedule: str) -> None:
    torch.manual_seed(0)
    lossconfig = copy.deepcopy(TINY_LOSSCONFIG)
    lossconfig["params"]["disc_start"] = 2
    torch.manual_seed(1234 + int(__import__("os").environ.get("LOCAL_RANK", 0)))  # different init per rank
    model = AutoencoderKL(
        TINY_DDCONFIG, lossconfig, embed_dim=4, learning_rate=1e-3, update_schedule=schedule
    )
    data = [
        {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        for i in range(8)
    ]
    spy = CountAllReduce()
    strategy = PerOptimizerDDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[spy])  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    rank = trainer.global_rank
    numel = {
        "autoencoder": sum(p.numel() for p in model._trainable_codec_parameters()),
        "discriminator": sum(p.numel() for p in model.loss.discriminator.parameters()),
        "all": sum(p.numel() for p in model.parameters() if p.requires_grad or p is model.loss.logvar),
    }
    record = {"per_batch": spy.per_batch, "per_step": strategy.reduced_elements, "numel": numel}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
