"""Experiment loggers for the CLI: W&B (offline on its own when it cannot reach the server), CSV, TensorBoard.

W&B in online mode without network blocks for about 100 s and may then fail the run; a training job must
never wait on a dashboard. So online mode is used only with credentials (``WANDB_API_KEY``, a ``~/.netrc``
entry for api.wandb.ai) and a server that answers within a few seconds; otherwise the run is written offline
into the run directory and the command to upload it later is printed. ``WANDB_MODE`` set by the user wins.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.errors import ConfigError
from klvae.training.run_dir import RunDir

__all__ = ["LOGGERS", "build_logger", "wandb_mode"]

log = logging.getLogger(__name__)

LOGGERS = ("wandb", "csv", "tensorboard")


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    # getaddrinfo has no timeout of its own: run the whole attempt in a thread and stop waiting after `timeout`.
    result = [False]

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0]


def wandb_mode() -> tuple[str, str]:
    """``(mode, reason)``: ``WANDB_MODE`` if set, else ``online`` with key and network, else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    if not _has_wandb_key():
        return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    if not _reachable(_wandb_host()):
        return "offline", f"{_wandb_host()} is not reachable"
    return "online", "API key found and server reachable"


def build_logger(kind: str, run: RunDir, name: str, project: str | None, launch: str = "0") -> Logger:
    """The experiment logger writing into ``run``; resumes the same W&B run when ``run`` has one.

    Args:
        kind: one of ``wandb``, ``csv``, ``tensorboard``.
        run: the run directory.
        name: display name of the run.
        project: W&B project (``None``: ``klvae``).
        launch: this launch's timestamp: CSV/TensorBoard write one sub-directory per launch, so a resume
            never overwrites the metrics of the launches before it.
    """
    if kind not in LOGGERS:
        raise ConfigError(f"--logger {kind!r}: choose one of {list(LOGGERS)}")
    if kind in ("csv", "tensorboard"):
        # Two launches of one run within the same second (a quick resume) must not share a version
        # directory: the second would overwrite the first one's metrics.
        version, n = launch, 0
        while (run.root / kind / version).exists():
            n += 1
            version = f"{launch}_{n}"
        cls = CSVLogger if kind == "csv" else TensorBoardLogger
        return cls(save_dir=str(run.root), name=kind, version=version)
    mode, reason = wandb_mode()
    run_id = run.read_wandb_id()
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
        if rank_zero_only.rank == 0:  # global rank from the launcher's env (RANK, LOCAL_RANK, SLURM_PROCID)
            run.write_wandb_id(run_id)
    os.environ.setdefault("WANDB_DIR", str(run.root))
    # Silence W&B's own console chatter about being offline; we print the one line that matters.
    os.environ.setdefault("WANDB_SILENT", "true")
    rank_zero_only(log.info)(f"W&B: {mode} mode ({reason}); run id {run_id}, project {project or 'klvae'}")
    if mode == "offline":
        rank_zero_only(log.info)(
            f"W&B: upload later with: wandb sync {Path(run.root) / 'wandb' / ('offline-run-*-' + run_id)}"
        )
    return WandbLogger(
        name=name,
        project=project or "klvae",
        save_dir=str(run.root),
        id=run_id,  # WandbLogger passes resume="allow": the same id continues the same run
        # WandbLogger(offline=True) forces WANDB_MODE=dryrun, which would override a user's "disabled".
        offline=mode not in ("online", "disabled"),
    )
