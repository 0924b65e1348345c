"""The run directory ``logs/<timestamp>_<name>/``: creation, resume resolution, saved configs, diffs.

Layout::

    logs/<timestamp>_<name>/
        checkpoints/   last.ckpt, iter_XXXXXXXX.ckpt (every N iterations), best-*.ckpt (top-k)
        configs/       <timestamp>-project.yaml: the merged config exactly as run (one per launch)
        images/        train/ and val/ reconstruction grids
        wandb/ | csv/ | tensorboard/   the logger's files
        wandb_run_id   so that a resumed run continues the same W&B run

Processes started by Lightning's DDP launcher re-run ``main.py``; they find the directory chosen by rank 0
in ``$KLVAE_RUN_DIR`` instead of computing a new timestamp. In a SLURM job the name uses the job id
instead of a timestamp, so every node agrees on it and a requeued job finds its own run again. Otherwise
the directory is created with an atomic ``mkdir`` (no ``exist_ok``): two launches in the same second get
``<timestamp>_<name>`` and ``<timestamp>_<name>_1``, never one shared directory.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from klvae.errors import ConfigError
from klvae.util import load_yaml_mapping, to_container

__all__ = [
    "RunDir",
    "config_diff",
    "create_run_dir",
    "load_run_config",
    "resolve_resume",
    "save_config",
    "RUN_DIR_ENV",
    "slurm_job_tag",
]

log = logging.getLogger(__name__)

RUN_DIR_ENV = "KLVAE_RUN_DIR"


@dataclass
class RunDir:
    """Paths of one run (all inside ``root``)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def make(self) -> None:
        for path in (self.checkpoints, self.configs, self.images):
            path.mkdir(parents=True, exist_ok=True)

    def read_wandb_id(self) -> str | None:
        path = self.root / "wandb_run_id"
        return path.read_text().strip() or None if path.is_file() else None

    def write_wandb_id(self, run_id: str) -> None:
        (self.root / "wandb_run_id").write_text(run_id + "\n")


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def slurm_job_tag() -> str | None:
    """``slurm<jobid>`` (or ``slurm<array>_<task>``) inside a SLURM batch job, else None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return f"slurm{os.environ['SLURM_JOB_ID']}"
    return None


def create_run_dir(logdir: str | os.PathLike, name: str, now: str, create: bool = True) -> RunDir:
    """The directory of a new run; reuses ``$KLVAE_RUN_DIR`` when a DDP launcher set it for us.

    Args:
        logdir: parent directory (created if needed).
        name: run name; the directory is ``<timestamp or SLURM job tag>_<name>``.
        now: this launch's timestamp.
        create: make the directory (rank 0). Other ranks only compute the name.

    Raises:
        OSError: the logdir cannot be created or written (full disk, read-only, no permission).
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return RunDir(Path(inherited))
    tag = slurm_job_tag()
    root = Path(logdir) / f"{tag or now}_{name}"
    if create:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        if tag:  # one directory per SLURM job, shared by all its nodes and by its requeued runs
            root.mkdir(exist_ok=True)
        else:
            for n in range(1, 10_000):
                try:
                    root.mkdir()  # atomic: exactly one concurrent launch succeeds for each name
                    break
                except FileExistsError:
                    root = Path(logdir) / f"{now}_{name}_{n}"
    run = RunDir(root)
    os.environ[RUN_DIR_ENV] = str(run.root)  # inherited by the processes Lightning's launcher starts
    return run


def _resume_candidates(run: RunDir) -> list[Path]:
    """``last.ckpt`` first, then the other checkpoints newest first."""
    if not run.checkpoints.is_dir():
        return []
    others = [p for p in run.checkpoints.glob("*.ckpt") if p.name != "last.ckpt"]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return ([run.last_ckpt] if run.last_ckpt.is_file() else []) + others


def resolve_resume(resume: str) -> tuple[RunDir | None, Path]:
    """Map ``--resume`` (a run directory or a ``.ckpt``) to ``(run dir or None, checkpoint path)``.

    A checkpoint inside ``<run>/checkpoints/`` belongs to ``<run>``; one elsewhere starts a new run dir.
    Every candidate is verified first (checksum, loadable, finite weights: ``checkpoint_problem``). For a
    run directory a damaged ``last.ckpt`` falls back to the newest checkpoint that verifies, saying so.

    Raises:
        ConfigError: the path does not exist; the named checkpoint is damaged; a run directory with no
            usable checkpoint.
    """
    from klvae.io.checkpoints import checkpoint_problem

    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume!r}: no such run directory or checkpoint file")
    if path.is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(
                f"--resume {resume!r}: cannot resume from this checkpoint: {problem}; "
                "pass an older checkpoint or the run directory (which picks the newest good one)"
            )
        if path.parent.name == "checkpoints" and (path.parent.parent / "configs").is_dir():
            return RunDir(path.parent.parent), path
        return None, path
    run = RunDir(path)
    rejected = []
    for candidate in _resume_candidates(run):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if rejected:
                log.warning("resuming from %s instead: %s", candidate.name, "; ".join(rejected))
            return run, candidate
        rejected.append(f"{candidate.name} {problem}")
    if rejected:
        raise ConfigError(f"--resume {resume!r}: no usable checkpoint: " + "; ".join(rejected))
    raise ConfigError(
        f"--resume {resume!r}: {run.last_ckpt} does not exist and {run.checkpoints} has no *.ckpt"
    )


def load_run_config(run: RunDir) -> DictConfig:
    """The run's saved configs merged in launch order (the last launch wins), as LDM does."""
    files = sorted(run.configs.glob("*.yaml"))
    if not files:
        raise ConfigError(f"run directory {str(run.root)!r} has no configs/*.yaml to resume with")
    hint = "repair it, or move it out of configs/ to resume with the run's other saved configs"
    return OmegaConf.merge(*(OmegaConf.create(load_yaml_mapping(f, hint)) for f in files))


def save_config(run: RunDir, config: DictConfig | Mapping[str, Any], now: str) -> Path:
    """Write the merged config of this launch to ``configs/<now>-project.yaml`` (resolved).

    Two launches within the same second (a quick resume) get ``<now>_1-project.yaml`` etc. (sorting after
    the first, as load_run_config merges in sorted order): a launch's
    record is never overwritten.
    """
    path = run.configs / f"{now}-project.yaml"
    n = 0
    while path.exists():
        n += 1
        path = run.configs / f"{now}_{n}-project.yaml"
    OmegaConf.save(OmegaConf.create(to_container(config)), path)
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_diff(old: Any, new: Any) -> list[str]:
    """Human-readable differences ``key: old -> new`` between two configs (dotted keys, sorted)."""
    a, b = _flatten(to_container(old)), _flatten(to_container(new))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"{key}: {a[key]!r} -> (removed)")
        elif key not in a:
            lines.append(f"{key}: (absent) -> {b[key]!r}")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return lines
