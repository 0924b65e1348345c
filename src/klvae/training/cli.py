"""``python main.py``: LDM's training command line on Lightning 2.

    python main.py --base configs/autoencoder_kl_f8.yaml -t --gpus 0,1,2,3
    python main.py -t -r logs/2025-01-01T00-00-00_autoencoder_kl_f8          # resume a run
    python main.py -b configs/demo.yaml -t model.params.lossconfig.params.disc_start=1000

Every user error -- a bad flag or config value, missing or undecodable data, an unusable checkpoint, a full
or read-only disk -- ends with one ``error:`` line and exit status 2, at whatever stage it happens (config,
data setup, the start of fit, resume, a checkpoint write); ``--traceback`` shows the full trace instead. A
bug inside klvae keeps its traceback. After SIGTERM/SIGUSR1/Ctrl-C the exit status is 128 + the signal
number (0 after a SLURM requeue); see docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from klvae.errors import is_user_error, report_user_error

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train or evaluate the KL autoencoder (LDM/Stable Diffusion first stage) with Lightning 2.",
        usage="%(prog)s [-b CONFIG.yaml ...] [-t] [options] [key.path=value ...]",
        epilog="key.path=value arguments (anywhere on the line) override the merged config, e.g. "
        "model.params.lossconfig.params.disc_start=1000 lightning.max_iterations=20000",
    )
    a = p.add_argument
    a(
        "-b",
        "--base",
        nargs="*",
        default=[],
        metavar="CONFIG.yaml",
        help="config files, merged left to right (later files win); overrides come after them",
    )
    a("-t", "--train", action="store_true", help="train (without it: only evaluate the --resume checkpoint)")
    a(
        "--gpus",
        default=None,
        help="GPU indices '0,' (GPU 0) or '0,1,2,3' (four GPUs), or a count '2'; absent: CPU "
        "(unless lightning.trainer.accelerator says otherwise)",
    )
    a("--num_nodes", type=int, default=None, help="number of nodes for multi-node DDP (default 1)")
    a(
        "-r",
        "--resume",
        default=None,
        metavar="RUN_DIR|CKPT",
        help="continue a run: a run directory (uses checkpoints/last.ckpt) or a .ckpt file; restores weights, "
        "optimizers, EMA, iteration counter, GAN phase and the W&B run",
    )
    a(
        "-n",
        "--name",
        default=None,
        help="run name: logs/<timestamp>_<name> (default: the first config's name); "
        "with --resume, starts a new run directory from that checkpoint",
    )
    a("-p", "--project", default=None, help="W&B project (default: klvae)")
    a("-s", "--seed", type=int, default=23, help="global seed (default 23, as LDM)")
    a("-l", "--logdir", default="logs", help="parent directory of run directories (default: logs)")
    a(
        "--scale_lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lr = accumulate_grad_batches * n_gpus * n_nodes * batch_size * base_learning_rate "
        "(LDM's rule, on by default); --no-scale_lr uses base_learning_rate as is",
    )
    a(
        "--no-test",
        dest="no_test",
        action="store_true",
        help="skip the evaluation after training (test split when model and data define one, else validation)",
    )
    a(
        "--precision",
        default=None,
        help="Lightning precision: bf16-mixed (default on GPU), 32-true (default on CPU), 16-mixed, ...",
    )
    a(
        "--logger",
        default="wandb",
        choices=["wandb", "csv", "tensorboard"],
        help="experiment logger (default wandb; offline on its own without API key or network)",
    )
    a(
        "--export",
        choices=["diffusers", "ldm"],
        default=None,
        help="after training, export the best checkpoint (else last.ckpt) to <run>/export/ "
        "(diffusers measures the latent scaling_factor and shift_factor on the validation data)",
    )
    a("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


# Warnings a user cannot act on: Lightning's generic advice that klvae's loaders already follow (or that
# does not apply to iteration-based training), and W&B's chatter. Everything else still shows.
_ROUTINE_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*that ended before the epoch ended.*",
    r".*on_epoch=True.*sync_dist.*",
    r".*It is recommended to use `self.log\(.*sync_dist=True\)`.*",
    r".*Trying to infer the `batch_size`.*",
    r".*You are using a CUDA device .* that has Tensor Cores.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*pkg_resources is deprecated.*",
    # klvae's streams split shards per rank and worker themselves, so their __len__ is exact.
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*Total length of `.*` across ranks is zero.*",  # no validation data: the recipe asked for none
)


def _silence_routine_warnings() -> None:
    for pattern in _ROUTINE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (in-process callers may swap it between runs)."""

    @property
    def stream(self):  # noqa: ANN201 (logging's attribute)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _configure_logging() -> None:
    klvae_log = logging.getLogger("klvae")
    if not any(isinstance(h, _StderrHandler) for h in klvae_log.handlers):
        for old in [h for h in klvae_log.handlers if type(h) is logging.StreamHandler]:
            klvae_log.removeHandler(old)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        klvae_log.addHandler(handler)
        klvae_log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    # Overrides may sit anywhere on the line (LDM allows `-t key=value --gpus 0,`): collect them from
    # what argparse did not recognise, and reject anything else that looks like a flag.
    args, rest = parser.parse_known_args(argv)
    flags = [r for r in rest if r.startswith("-") or "=" not in r]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)} (config overrides look like key.path=value)")
    args.overrides = rest
    # `-b a.yaml key=value` makes argparse put the override into --base (nargs="*"): move it back.
    overrides = [b for b in args.base if "=" in b and not b.endswith((".yaml", ".yml"))]
    args.base = [b for b in args.base if b not in overrides]
    args.overrides = overrides + args.overrides
    _configure_logging()
    from klvae.training.run_dir import RUN_DIR_ENV

    _silence_routine_warnings()
    saved_env = os.environ.get(RUN_DIR_ENV)
    try:
        from klvae.training.launch import prepare, run

        try:
            return run(prepare(args))
        except Exception as e:
            if args.traceback or not is_user_error(e):
                raise
            return report_user_error(e)
    finally:
        # In-process callers (tests, notebooks) must not inherit this run's directory in their next run.
        if saved_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = saved_env


if __name__ == "__main__":
    sys.exit(main())
