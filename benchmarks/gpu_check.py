#!/usr/bin/env python
"""klvae's GPU check: the CUDA tests, then the side-by-side benchmarks, in one command of ~8 minutes.

On a machine with one NVIDIA GPU, from the repository root (no internet needed)::

    python benchmarks/gpu_check.py --wheels .whl --out gpu_check_out

1. installs the wheels in ``--wheels`` (packages the machine lacks; see docs/performance.md) into a
   private folder, and puts ``src/`` first on the path (klvae itself is not installed);
2. runs the steps of :data:`STEPS` in order, each in a fresh process under its own timeout, while the
   ``--budget`` lasts (a step is skipped, and named so, when less time is left than it needs):
   ``env`` (versions, GPU), ``pytest_gpu`` (``pytest -m gpu`` on the test files that have GPU tests),
   the pre-GAN training step of klvae (``default`` and ``plain``) and of diffusers' ``AutoencoderKL``
   (eager and compiled), a 1024² decode whole and tiled, the GAN phase in both schedules next to
   diffusers' alternating step, and 512² training at batch 4 with and without gradient checkpointing;
3. writes to ``--out`` (default ``$OUT``, else ``gpu_check_out``): ``results.jsonl`` (every benchmark
   record, tagged with its ``step``), ``steps.jsonl`` (status, seconds, records per step), ``summary.md``
   (tables and the same-run ratios; also printed at the end), ``env.json``, ``steps.log`` (each step's
   command and the end of its output) and ``pytest.log``.

Every benchmark runs under the same flags: bf16 autocast, cudnn.benchmark and TF32 on for klvae and
diffusers alike. VGG-LPIPS uses ImageNet weights when they are where klvae looks for them
(``klvae-fetch-weights``, torchvision's cache, ``$KLVAE_CACHE``), else a random trunk, named in every
record and in the summary (timing and memory do not depend on the weights' values).

``--smoke`` runs the same steps on the CPU with a tiny network in about a minute (forked from this
process: no interpreter start per step), so the check cannot rot (``tests/benchmarks/test_gpu_check.py``).

Adding a step is one :class:`Step` entry in :data:`STEPS` (a benchmark script and its arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import logging
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_summary import write_summary

log = logging.getLogger("benchmarks.gpu_check")

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check: ``benchmarks/<script>.py`` run with ``args`` plus its size's arguments.

    Attributes:
        name: the step's name (``--only``/``--skip``, the ``step`` field of its records).
        script: a module of ``benchmarks/`` with ``main(argv)`` (``train_step``, ``codec``,
            ``environment``), or ``pytest`` (``pytest -m gpu`` on the test files with GPU tests).
        args: the script's arguments, the same on GPU and in ``--smoke``.
        size: key of :data:`SIZES`: batch, resolution and iteration counts, GPU or smoke.
        limit_s: the step's timeout on a GPU (also capped by the budget left).
        min_s: skipped on a GPU when less of the budget is left than this.
        about: one line for the summary.
    """

    name: str
    script: str
    args: tuple[str, ...] = ()
    size: str = "none"
    limit_s: int = 120
    min_s: int = 30
    about: str = ""


# Size arguments per mode. GPU: the default recipe's batch 12 at 256², bf16; the compiled variants
# compile during the warm-up, which is timed apart (compile_s). Smoke: the tests' tiny network on CPU.
SIZES: dict[str, dict[str, tuple[str, ...]]] = {
    "none": {"gpu": (), "smoke": ()},
    "train_256": {
        "gpu": ("--batch", "12", "--resolution", "256", "--steps", "20", "--warmup", "5"),
        "smoke": ("--batch", "1", "--resolution", "32", "--steps", "1", "--warmup", "1"),
    },
    "train_512": {
        "gpu": ("--batch", "4", "--resolution", "512", "--steps", "10", "--warmup", "3"),
        "smoke": ("--batch", "1", "--resolution", "48", "--steps", "1", "--warmup", "1"),
    },
    "decode_1024": {
        "gpu": ("--batch", "1", "--resolution", "256", "--big-resolution", "1024", "--tile-size", "512",
                "--tile-overlap", "64"),
        "smoke": ("--batch", "1", "--resolution", "32", "--big-resolution", "64", "--tile-size", "32",
                  "--tile-overlap", "8"),
    },
}  # fmt: skip
# Every benchmark, every mode: the same backend flags for klvae and diffusers.
DEVICE_ARGS = {
    "gpu": ("--device", "cuda", "--model", "kl-f8", "--precision", "bf16"),
    # A nominal 1 TFLOP/s peak so the MFU column is computed (it says nothing on a CPU).
    "smoke": ("--device", "cpu", "--model", "tiny", "--precision", "fp32", "--peak-tflops", "1"),
}
FLAG_ARGS = ("--cudnn-benchmark", "true", "--tf32")

# The 2025 pieces as --loss-param YAML; random backbone weights (the device has no hub cache; timing and
# memory do not depend on the weights).
_VF = ("{target: klvae.modules.vf_loss.VFLoss, params: {latent_channels: 4, weight: 0.1, adaptive: true, "
       "backbone: {target: klvae.modules.backbones.FrozenViT, params: {model_name: vit_small_patch14_dinov2.lvd142m, "
       "allow_random_backbone: true}}}}")  # fmt: skip
_DINO_D = ("{target: klvae.modules.dino_discriminator.DinoDiscriminator, params: {backbone: {target: "
           "klvae.modules.backbones.FrozenViT, params: {model_name: vit_small_patch16_224.dino, "
           "allow_random_backbone: true}}}}")  # fmt: skip

# In priority order: what is cut when the budget runs out is at the end. Within a step the cheap eager
# cases come first, so a compile that outlasts the step's limit still leaves them measured.
STEPS: list[Step] = [
    Step("env", "environment", limit_s=60, min_s=10, about="versions, GPU, LPIPS weights"),
    Step("pytest_gpu", "pytest", limit_s=120, min_s=45, about="pytest -m gpu (bf16, inductor, no host sync)"),
    Step("pre_klvae", "train_step",
         ("--cases", "pre", "--variant", "plain", "--variant", "default", "--diffusers", "none"),
         "train_256", 240, 90, "klvae pre-GAN step: plain (eager) and default (compiled)"),
    Step("pre_diffusers", "train_step", ("--cases", "pre", "--no-klvae", "--diffusers", "auto"),
         "train_256", 180, 60, "diffusers AutoencoderKL pre-GAN step, eager and compiled"),
    Step("decode_1024", "codec", ("--variant", "plain", "--diffusers", "none", "--no-throughput"),
         "decode_1024", 90, 20, "klvae decode of one 1024² image, whole and in 512² tiles"),
    Step("gan_klvae", "train_step",
         ("--cases", "post-alternate,post-every_batch", "--variant", "plain", "--variant", "default",
          "--diffusers", "none"),
         "train_256", 300, 120, "klvae GAN phase, alternate and every_batch schedules"),
    Step("gan_diffusers", "train_step", ("--cases", "post-alternate", "--no-klvae", "--diffusers", "auto"),
         "train_256", 200, 60, "diffusers' alternating GAN step, eager and compiled"),
    Step("train_512", "train_step",
         ("--cases", "pre", "--variant", "default", "--variant", "default+gradient_checkpointing=true",
          "--diffusers", "none"),
         "train_512", 240, 90, "klvae 512² at batch 4, with and without gradient checkpointing"),
    Step("vf_klvae", "train_step",
         ("--cases", "pre", "--variant", "default", "--diffusers", "none", "--loss-param", f"terms={{vf: {_VF}}}"),
         "train_256", 180, 60, "klvae pre-GAN step with VA-VAE's VF loss (DINOv2 ViT-S/14, random weights)"),
    Step("dino_disc_klvae", "train_step",
         ("--cases", "post-alternate", "--variant", "default", "--diffusers", "none",
          "--loss-param", f"discriminator_config={_DINO_D}", "--loss-param", "lecam_weight=0.1"),
         "train_256", 180, 60, "klvae GAN phase with the DINO ViT-S/16 discriminator and LeCam (random weights)"),
]  # fmt: skip


# -------------------------------------------------------------------------------------------- launch
@dataclasses.dataclass
class Outcome:
    rc: int  # 124: timed out
    seconds: float
    stdout: str
    stderr: str


def _entry_point(script: str) -> Callable[[list[str]], Any]:
    return importlib.import_module(f"benchmarks.{script}").main


def preload(steps: list[Step]) -> None:
    """Import every forked step's modules once, here, so that no child pays for it (``--launcher fork``)."""
    for script in {s.script for s in steps if s.script != "pytest"}:
        _entry_point(script)
    with contextlib.suppress(ImportError):  # diffusers is a lazy module: the model class is the slow part
        from diffusers import AutoencoderKL  # noqa: F401


def _child(script: str, argv: list[str], out: str, err: str) -> None:
    """A forked step: own process group (killed as one), stdout/stderr into files."""
    os.setpgrp()
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (replaces a captured stream)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(sys.stderr)]
    _entry_point(script)(argv)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pid, sig)


def run_forked(script: str, argv: list[str], limit_s: float, workdir: Path) -> Outcome:
    """Run ``benchmarks.<script>.main(argv)`` in a forked child (no interpreter start, no re-import)."""
    out, err = workdir / "stdout", workdir / "stderr"
    t0 = time.monotonic()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(script, argv, str(out), str(err)))
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():  # past its limit: the whole group (inductor's compile workers too)
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            _signal_group(proc.pid, sig)
            proc.join(wait_s)
            if not proc.is_alive():
                break
        rc = 124
    else:
        rc = proc.exitcode if proc.exitcode is not None and proc.exitcode >= 0 else 128 - (proc.exitcode or 0)
    return Outcome(
        rc, time.monotonic() - t0, out.read_text(errors="replace"), err.read_text(errors="replace")
    )


def run_subprocess(command: list[str], limit_s: float, workdir: Path, env: dict[str, str]) -> Outcome:
    """Run ``command`` from the repository root in its own session, killed as a group at the limit."""
    out, err = workdir / "stdout", workdir / "stderr"
    t0 = time.monotonic()
    with out.open("w") as f_out, err.open("w") as f_err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=f_out, stderr=f_err, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:  # past its limit: the whole group (compile workers too)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return Outcome(
        rc, time.monotonic() - t0, out.read_text(errors="replace"), err.read_text(errors="replace")
    )


# --------------------------------------------------------------------------------------------- steps
def gpu_test_files() -> list[str]:
    """Test files that contain GPU tests (so collection needs no more than they import)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )


def step_argv(step: Step, mode: str, backbone: str, extra: tuple[str, ...]) -> list[str]:
    """The script's arguments: the step's own, then the mode's device, size and backend flags."""
    argv = [*step.args, *DEVICE_ARGS[mode], *SIZES[step.size][mode], *FLAG_ARGS, *extra]
    if step.script == "train_step":
        argv += ["--perceptual-backbone", backbone]
    return argv


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_record(output: str, rc: int, seconds: float) -> dict[str, Any]:
    """Counts from pytest's last line (``2 passed, 1 skipped in 40.1s``)."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for number, kind in _PYTEST_COUNTS.findall(lines[-1] if lines else ""):
        key = "errors" if kind.startswith("error") else kind
        if key in counts:
            counts[key] = int(number)
    return {"bench": "pytest", "rc": rc, "seconds": round(seconds, 1), **counts}


def json_records(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("not a JSON record: %s", line[:200])
    return records


def stderr_digest(stderr: str, lines: int = 25) -> tuple[str, dict[str, int]]:
    """The end of a step's stderr (warnings dropped) and its recompile / graph-break counts."""
    counts = {
        "recompiles": stderr.count("Recompiling function"),
        "graph_breaks": len(re.findall(r"[Gg]raph [Bb]reak", stderr)),
    }
    kept = [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    return "\n".join(kept[-lines:]), counts


# ---------------------------------------------------------------------------------------------- main
def install_wheels(wheels: Path, site: Path) -> str:
    """``pip install --no-index --no-deps`` every wheel in ``wheels`` into ``site`` (offline)."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, files)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode:
        return f"pip install failed (rc {done.returncode}): {done.stderr.strip()[-500:]}"
    return f"installed {len(files)} wheels from {wheels} into {site}"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        changed = len([ln for ln in dirty.stdout.splitlines() if ln.strip()])
        return f"{rev.stdout.strip()} ({changed} changed paths)" if rev.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def nvidia_smi() -> str | None:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    try:
        done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def resolve_backbone(choice: str) -> str:
    """``auto``: ``imagenet`` when VGG16 weights are where klvae looks for them, else ``random``."""
    if choice != "auto":
        return choice
    from klvae.io.cache import VGG16_HUB_FILENAME, lpips_full_path, torch_hub_checkpoint

    found = any(p.is_file() for p in (torch_hub_checkpoint(VGG16_HUB_FILENAME), lpips_full_path()))
    if not found:
        log.warning("no VGG16 weights found (klvae-fetch-weights): LPIPS runs with a random trunk")
    return "imagenet" if found else "random"


def select_steps(only: str | None, skip: str | None) -> list[Step]:
    names = [s.name for s in STEPS]
    chosen = [n.strip() for n in (only or "").split(",") if n.strip()]
    skipped = [n.strip() for n in (skip or "").split(",") if n.strip()]
    unknown = [n for n in chosen + skipped if n not in names]
    if unknown:
        raise SystemExit(f"error: unknown step(s) {unknown}; steps: {names}")
    return [s for s in STEPS if (not chosen or s.name in chosen) and s.name not in skipped]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"steps, in order: {', '.join(s.name for s in STEPS)}",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else gpu_check_out)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480)")
    parser.add_argument("--wheels", default=".whl", help="folder of wheels to install first (if it exists)")
    parser.add_argument("--only", default=None, help="comma list of steps to run")
    parser.add_argument("--skip", default=None, help="comma list of steps to leave out")
    parser.add_argument(
        "--perceptual-backbone", default="auto",
        help="'auto' (ImageNet VGG weights if found, else random), 'imagenet', 'random' or a file",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="the same steps on CPU, tiny network, ~1 min")
    parser.add_argument(
        "--compile-backend", choices=["inductor", "aot_eager"], default=None,
        help="aot_eager compiles what a GPU run compiles with eager kernels (a CPU rehearsal of the "
        "compiled paths; slow on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--launcher", choices=["subprocess", "fork"], default=None,
        help="how steps start: a fresh interpreter each (default on GPU) or forked (default with --smoke)",
    )  # fmt: skip
    return parser


@dataclasses.dataclass
class Run:
    """What the steps of one check share, and what they produced so far."""

    out: Path
    mode: str  # "gpu" or "smoke"
    launcher: str  # "subprocess" or "fork"
    backbone: str  # --perceptual-backbone, resolved
    extra: tuple[str, ...]  # arguments every benchmark script gets (--compile-backend)
    child_env: dict[str, str]
    env: dict[str, Any]  # env.json
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outcomes: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def start_step(
    step: Step, run: Run, limit_s: float, workdir: Path
) -> tuple[Outcome, list[dict[str, Any]], str]:
    """Run ``step`` to its end or its limit; return its outcome, its records and its command as shown."""
    if step.script == "pytest":
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
        command = [*pytest, *gpu_test_files()]
        outcome = run_subprocess(command, limit_s, workdir, run.child_env)
        (run.out / "pytest.log").write_text(outcome.stdout + outcome.stderr)
        if outcome.rc == 5:  # no test collected: nothing failed
            outcome.rc = 0
        return outcome, [pytest_record(outcome.stdout, outcome.rc, outcome.seconds)], " ".join(command[1:])
    argv = step_argv(step, run.mode, run.backbone, run.extra) if step.size != "none" else []
    if run.launcher == "fork":
        outcome = run_forked(step.script, argv, limit_s, workdir)
    else:
        outcome = run_subprocess([sys.executable, "-m", f"benchmarks.{step.script}", *argv], limit_s, workdir,
                                 run.child_env)  # fmt: skip
    return outcome, json_records(outcome.stdout), " ".join([f"benchmarks/{step.script}.py", *argv])


def finish_step(
    step: Step, run: Run, outcome: Outcome, records: list[dict[str, Any]], shown: str, limit_s: float
) -> None:
    """Append the step's records, status and output tail to the output files."""
    status = "ok" if outcome.rc == 0 else ("timeout" if outcome.rc == 124 else "failed")
    tail, counts = stderr_digest(outcome.stderr)
    for record in records:
        record["step"] = step.name
        _append(run.out / "results.jsonl", record)
    run.records += records
    run.outcomes.append({"step": step.name, "status": status, "rc": outcome.rc, "seconds": round(outcome.seconds, 1),
                         "limit_s": round(limit_s), "records": len(records), **counts, "about": step.about})  # fmt: skip
    _append(run.out / "steps.jsonl", run.outcomes[-1])
    other_output = "\n".join(ln for ln in outcome.stdout.splitlines() if not ln.startswith("{"))[-2000:]
    header = f"===== {step.name}: {status} rc={outcome.rc} {outcome.seconds:.1f}s\n$ {shown}"
    with (run.out / "steps.log").open("a") as f:
        f.write(f"{header}\n{tail}\n{other_output}\n")
    log.info("%-14s %-7s %5.1fs %d records", step.name, status, outcome.seconds, len(records))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.monotonic()
    steps = select_steps(args.only, args.skip)
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "steps.jsonl", "steps.log", "pytest.log"):
        (out / name).write_text("")
    launcher = args.launcher or ("fork" if args.smoke else "subprocess")
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "mode": "smoke" if args.smoke else "gpu", "launcher": launcher, "budget_s": args.budget,
           "command": " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
           "git": git_revision(), "platform": platform.platform(), "nvidia_smi": nvidia_smi()}  # fmt: skip

    site = Path(tempfile.gettempdir()) / "klvae_gpu_check_site"
    if not args.smoke and Path(args.wheels).is_dir():
        env["wheels"] = install_wheels(Path(args.wheels), site)
    paths = [str(REPO / "src"), *([str(site)] if "wheels" in env else []), str(REPO)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    child_env |= {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                  "TORCH_LOGS": "recompiles,graph_breaks"}  # fmt: skip
    for path in reversed(paths):  # this process too: it resolves the LPIPS weights and forks the steps
        if path not in sys.path:
            sys.path.insert(0, path)
    if launcher == "fork":
        preload(steps)
    env["perceptual_backbone"] = resolve_backbone(args.perceptual_backbone)
    extra = ("--compile-backend", args.compile_backend) if args.compile_backend else ()
    run = Run(out, env["mode"], launcher, env["perceptual_backbone"], extra, child_env, env)

    with tempfile.TemporaryDirectory(prefix="klvae_gpu_check_") as tmp:
        for step in steps:
            left = args.budget - (time.monotonic() - started)
            if left < step.min_s:
                run.outcomes.append({"step": step.name, "status": "skipped", "about": step.about,
                                     "reason": f"{left:.0f}s left, needs {step.min_s}s"})  # fmt: skip
                _append(out / "steps.jsonl", run.outcomes[-1])
            else:
                limit = min(step.limit_s, left)
                (Path(tmp) / step.name).mkdir()
                finish_step(step, run, *start_step(step, run, limit, Path(tmp) / step.name), limit)
            env["total_s"] = round(time.monotonic() - started, 1)
            (out / "env.json").write_text(json.dumps(env, indent=1, sort_keys=True) + "\n")
            write_summary(out / "summary.md", run.records, run.outcomes, env)  # after every step
    sys.stdout.write(write_summary(out / "summary.md", run.records, run.outcomes, env))
    return 1 if any(o["status"] in ("failed", "timeout") for o in run.outcomes) else 0


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
