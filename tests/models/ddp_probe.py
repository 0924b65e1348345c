"""Two-rank gloo training run for tests/models/test_ddp.py (Lightning relaunches this script per rank).

    python tests/models/ddp_probe.py OUT_DIR SCHEDULE [faults]

Each rank writes OUT_DIR/rank{r}.json (gradient elements all-reduced per batch, as seen by a spy on
torch.distributed.all_reduce, and in total, as the strategy counted them; the non-finite guard's counters)
and OUT_DIR/rank{r}.pt (its final state dict and both optimizers' states).

``faults``: the hard case for rank consistency, all at once: 16-mixed with a real GradScaler and fused Adam,
2 micro-batches per round, EMA, an ActNorm discriminator (data-dependent init), a NaN autoencoder *loss* with
finite gradients on rank 1 only in the first micro-batch of round 2, and NaN discriminator *gradients* on
rank 0 only in the second micro-batch of round 3.
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
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from klvae.training.ddp import PerOptimizerDDPStrategy  # noqa: E402
from tests.conftest import TINY_DDCONFIG, TINY_LOSSCONFIG  # noqa: E402
from tests.models.faults import FaultyAutoencoderKL  # noqa: E402

FAULTS = [
    {"optimizer": "ae", "kind": "loss", "iterations": [2], "micro": [0], "rank": 1},
    {"optimizer": "disc", "kind": "grad", "iterations": [3], "micro": [1], "rank": 0},
]


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


def main(out: Path, schedule: str, scenario: str = "plain") -> None:
    torch.manual_seed(0)
    lossconfig = copy.deepcopy(TINY_LOSSCONFIG)
    lossconfig["params"]["disc_start"] = 2
    params: dict = {"update_schedule": schedule}
    trainer_kwargs: dict = {}
    batches = 8
    if scenario == "faults":
        lossconfig["params"]["use_actnorm"] = True
        params.update(
            faults=FAULTS, accumulate_grad_batches=2, ema_decay=0.9, optimizations={"fused_adam": True}
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        trainer_kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler)]
        batches = 20
    if scenario == "vf":
        from tests.conftest import tiny_backbone_config

        lossconfig["params"].update(
            lecam_weight=0.1, r1_gamma=1.0, r1_interval=2,
            discriminator_config={
                "target": "klvae.modules.dino_discriminator.DinoDiscriminator",
                "params": {"backbone": tiny_backbone_config("vit_small_patch16_224.dino"), "blocks": [1, 3, -1]},
            },
            terms={"vf": {"target": "klvae.modules.vf_loss.VFLoss", "params": {
                "latent_channels": 4, "weight": 0.1, "adaptive": True, "backbone": tiny_backbone_config()}}},
        )  # fmt: skip
        del lossconfig["params"]["disc_num_layers"], lossconfig["params"]["disc_ndf"]
        params.update(ema_decay=0.9)
    torch.manual_seed(1234 + int(__import__("os").environ.get("LOCAL_RANK", 0)))  # different init per rank
    model = FaultyAutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig=lossconfig, embed_dim=4, learning_rate=1e-3,
                                **params)  # fmt: skip
    data = [
        {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
        for i in range(batches)
    ]
    spy = CountAllReduce()
    strategy = PerOptimizerDDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[spy],
                         **trainer_kwargs)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    rank = trainer.global_rank
    numel = {
        "autoencoder": sum(p.numel() for p in model._trainable_codec_parameters()),
        "discriminator": sum(p.numel() for p in model.loss.discriminator.parameters()),
        "vf_projection": sum(p.numel() for p in model.loss.autoencoder_parameters()),
        "all": sum(p.numel() for p in model.parameters() if p.requires_grad or p is model.loss.logvar),
    }
    record = {
        "per_batch": spy.per_batch,
        "reduced_total": strategy.reduced_elements,
        "numel": numel,
        "nonfinite": model.nonfinite.counters(),
        "injected": model.injected,
        "iteration": model.iteration,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    optimizers = [o.state_dict()["state"] for o in trainer.optimizers]
    torch.save({"model": model.state_dict(), "optimizers": optimizers}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
