"""The GPU check's ``summary.md``: its records as markdown tables, and the same-run ratios next to the targets.

Ratios are taken between records of one run only (same machine, same flags); a comparison whose records
are missing (a step skipped, failed or timed out) says so instead of a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "Target", "find", "write_summary"]

Record = dict[str, Any]


def find(records: list[Record], step: str, **fields: Any) -> Record | None:
    """The first record of ``step`` whose fields equal ``fields`` (and that has a measurement)."""
    for r in records:
        if r.get("step") == step and all(r.get(k) == v for k, v in fields.items()) and not r.get("oom"):
            return r
    return None


def _speedup(a: Record | None, b: Record | None, pairs: float = 1.0) -> float | None:
    """How many times faster ``a`` is than ``b`` per iteration (``b``'s time scaled by ``pairs``)."""
    if not a or not b or not a.get("ms_per_iter") or not b.get("ms_per_iter"):
        return None
    return pairs * b["ms_per_iter"] / a["ms_per_iter"]


def _klvae(records: list[Record], step: str, case: str, variant: str = "default") -> Record | None:
    return find(records, step, impl="klvae", case=case, variant=variant)


def _diffusers(records: list[Record], step: str, case: str, flavour: str) -> Record | None:
    return find(records, step, impl=f"diffusers-{flavour}", case=case)


class Target:
    """One row of the comparison table: a value computed from the run's records, and its goal.

    Args:
        what: the comparison, in words.
        value: records → number (None when a record it needs is missing).
        goal: the target, in words (e.g. ``≥ 2.5× (2.0× least)``).
        unit: how the number is printed: ``x`` (ratio), ``GiB`` or ``%``.
    """

    def __init__(
        self, what: str, value: Callable[[list[Record]], float | None], goal: str, unit: str
    ) -> None:
        self.what, self.value, self.goal, self.unit = what, value, goal, unit

    def row(self, records: list[Record]) -> str:
        value = self.value(records)
        if value is None:
            shown = "not measured"
        elif value == math.inf:
            shown = "OOM"
        elif self.unit == "x":
            shown = f"{value:.2f}×"
        elif self.unit == "%":
            shown = f"{100 * value:.1f} %"
        else:
            shown = f"{value:.2f} {self.unit}"
        return f"| {self.what} | {shown} | {self.goal} |"


def _decode(records: list[Record], tiled: bool) -> Record | None:
    for r in records:
        if r.get("step") == "decode_1024" and str(r.get("mode", "")).startswith("tiled") == tiled:
            return r
    return None


def _peak(record: Record | None) -> float | None:
    if record and record.get("oom"):
        return math.inf  # printed as "OOM"
    return record.get("peak_mem_gib") if record else None


# The targets of docs/performance.md, each computed from this run's records.
TARGETS = [
    Target("pre-GAN img/s: klvae default ÷ diffusers eager",
           lambda rs: _speedup(_klvae(rs, "pre_klvae", "pre"), _diffusers(rs, "pre_diffusers", "pre", "eager")),
           "≥ 2.5× (2.0× least)", "x"),
    Target("pre-GAN img/s: klvae default ÷ diffusers compiled",
           lambda rs: _speedup(_klvae(rs, "pre_klvae", "pre"), _diffusers(rs, "pre_diffusers", "pre", "compiled")),
           "≥ 1.75× (1.4× least)", "x"),
    Target("pre-GAN MFU, klvae default", lambda rs: (_klvae(rs, "pre_klvae", "pre") or {}).get("mfu"),
           "≥ 50 %", "%"),
    Target("pre-GAN steady-state peak, klvae default", lambda rs: _peak(_klvae(rs, "pre_klvae", "pre")),
           "≤ 12 GiB at batch 12, 256²", "GiB"),
    Target("GAN phase, alternate: klvae default ÷ diffusers eager (per iteration)",
           lambda rs: _speedup(_klvae(rs, "gan_klvae", "post-alternate"),
                               _diffusers(rs, "gan_diffusers", "post-alternate", "eager")),
           "≥ 2.5× (2.0× least)", "x"),
    Target("GAN phase, alternate: klvae default ÷ diffusers compiled (per iteration)",
           lambda rs: _speedup(_klvae(rs, "gan_klvae", "post-alternate"),
                               _diffusers(rs, "gan_diffusers", "post-alternate", "compiled")),
           "≥ 1.75× (1.4× least)", "x"),
    Target("GAN phase, every_batch: klvae default ÷ diffusers eager (per AE + D update pair)",
           lambda rs: _speedup(_klvae(rs, "gan_klvae", "post-every_batch"),
                               _diffusers(rs, "gan_diffusers", "post-alternate", "eager"), pairs=2.0),
           "≥ 2.5× (2.0× least)", "x"),
    Target("512², batch 4, klvae default: steady-state peak", lambda rs: _peak(_klvae(rs, "train_512", "pre")),
           "≤ 40 GiB", "GiB"),
    Target("512², batch 4, klvae default + gradient checkpointing: steady-state peak",
           lambda rs: _peak(_klvae(rs, "train_512", "pre", "default+gradient_checkpointing=true")),
           "≤ 40 GiB", "GiB"),
    Target("1024² decode, whole: peak", lambda rs: _peak(_decode(rs, tiled=False)), "≤ 10 GiB", "GiB"),
    Target("1024² decode, 512² tiles: peak", lambda rs: _peak(_decode(rs, tiled=True)), "≤ 10 GiB", "GiB"),
]  # fmt: skip


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_summary(path: Path, records: list[Record], steps: list[Record], env: dict[str, Any]) -> str:
    """Write ``summary.md`` from the run's records, step outcomes and environment; return its text."""
    probe = next((r for r in records if r.get("bench") == "env"), {})
    train = [r for r in records if r.get("bench") == "train_step"]
    flags = train[0].get("backend_flags") if train else None
    smoke = env.get("mode") == "smoke"
    lines = [f"# klvae GPU check, {env.get('date', '')}", ""]
    if smoke:
        lines += ["**Smoke run on a CPU with a tiny network: these numbers show that the check runs, nothing "
                  "about speed** (memory is the process's peak RSS, MFU uses a nominal 1 TFLOP/s).", ""]  # fmt: skip
    backbone = env.get("perceptual_backbone") or (train[0].get("perceptual_backbone") if train else None)
    lines += [
        f"- device: {probe.get('device_name', 'cpu')} ({probe.get('memory_gib', '—')} GiB); torch "
        f"{probe.get('torch', '—')}, CUDA {probe.get('cuda', '—')}, cuDNN {probe.get('cudnn', '—')}, "
        f"diffusers {probe.get('version_diffusers', '—')}",
        f"- command: `{env.get('command', '')}`; git {env.get('git', '—')}; "
        f"{env.get('total_s', '—')} s of a {env.get('budget_s', '—')} s budget",
        f"- every case: {train[0].get('precision', '—') if train else '—'}, backend flags {flags}",
        "- VGG-LPIPS: " + ("ImageNet weights" if backbone == "imagenet" else
                            f"{backbone} (random trunk: timing and memory as with real weights)"),
    ]  # fmt: skip
    if env.get("wheels"):
        lines.append(f"- wheels: {env['wheels']}")

    lines += ["", "## Steps", ""]
    lines += _table(
        ["step", "status", "s", "limit s", "records", "recompiles", "graph breaks", "what"],
        [[o["step"], o["status"] + (f" ({o['reason']})" if o.get("reason") else ""), _fmt(o.get("seconds")),
          _fmt(o.get("limit_s")), _fmt(o.get("records")), _fmt(o.get("recompiles")),
          _fmt(o.get("graph_breaks")), o.get("about", "")] for o in steps],
    )  # fmt: skip

    lines += ["", "## Training step (ms/iter: mean, median [min–max]; peak: steady state, warm-up)", ""]
    lines += _table(
        ["step", "impl", "case", "variant", "batch", "res", "img/s", "ms/iter", "peak GiB", "warm-up GiB",
         "compile s", "GFLOP/img", "MFU"],
        [[r["step"], r.get("impl", ""), r.get("case", ""), r.get("variant", ""), _fmt(r.get("batch")),
          _fmt(r.get("resolution")), _fmt(r.get("img_per_s")),
          f"{_fmt(r.get('ms_per_iter'))}, {_fmt(r.get('ms_per_iter_median'))} "
          f"[{_fmt(r.get('ms_per_iter_min'))}–{_fmt(r.get('ms_per_iter_max'))}]",
          _fmt(r.get("peak_mem_gib"), 2), _fmt(r.get("warmup_peak_mem_gib"), 2), _fmt(r.get("compile_s")),
          _fmt(r.get("gflops_per_img"), 2), _fmt(r.get("mfu"), 3)] for r in train],
    )  # fmt: skip

    decode = [r for r in records if r.get("bench") == "codec" and "mode" in r]
    if decode:
        lines += ["", "## Decode (one image)", ""]
        lines += _table(
            ["op", "mode", "s", "peak GiB"],
            [[r.get("op", ""), r.get("mode", ""), "OOM" if r.get("oom") else _fmt(r.get("seconds"), 3),
              "OOM" if r.get("oom") else _fmt(r.get("peak_mem_gib"), 2)] for r in decode],
        )  # fmt: skip

    tests = next((r for r in records if r.get("bench") == "pytest"), None)
    if tests:
        lines += ["", "## CUDA tests (`pytest -m gpu`, output in pytest.log)", ""]
        lines += _table(
            ["passed", "failed", "skipped", "errors", "s"],
            [[str(tests[k]) for k in ("passed", "failed", "skipped", "errors", "seconds")]],
        )

    lines += ["", "## Same-run comparisons and targets", ""]
    lines += ["| comparison | this run | target |", "|---|---|---|"]
    lines += [target.row(records) for target in TARGETS]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
