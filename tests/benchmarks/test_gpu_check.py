"""benchmarks/gpu_check.py: the whole check runs on a CPU (--smoke), so the GPU run cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import STEPS, Step

REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(value) -> list[float]:
    """Every number inside a record (nested dicts and lists included; booleans are not numbers)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


# What a VF-loss or DINO-discriminator step will look like: one entry, a benchmark script with its
# arguments (here a loss parameter) and a size. The smoke run below includes it.
NEW_STEP = Step("kl_term", "train_step", ("--cases", "pre", "--variant", "plain", "--diffusers", "none",
                                          "--loss-param", "kl_weight=1.0e-5"), "train_256", 60, 10, "KL ×10")  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One ``--smoke`` run of every step (and :data:`NEW_STEP`), forked from this process (~30 CPU-s)."""
    out = tmp_path_factory.mktemp("gpu_check")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_check, "STEPS", [*STEPS, NEW_STEP])
        rc = gpu_check.main(["--smoke", "--out", str(out), "--perceptual-backbone", "random"])
    assert rc == 0, (out / "steps.log").read_text()
    return out


def test_smoke_run_measures_every_step_with_finite_numbers(smoke_run):
    steps = {s["step"]: s for s in _lines(smoke_run / "steps.jsonl")}
    assert list(steps) == [s.name for s in [*STEPS, NEW_STEP]]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    records = _lines(smoke_run / "results.jsonl")
    for step in STEPS:
        mine = [r for r in records if r["step"] == step.name]
        assert mine and steps[step.name]["records"] == len(mine), step.name
        for record in mine:
            assert all(math.isfinite(x) for x in _numbers(record)), record
    measured = [r for r in records if r["bench"] == "train_step"]
    assert all(r["img_per_s"] > 0 and r["flops_per_iter"] > 0 and r["mfu"] > 0 for r in measured)
    assert all(r["peak_mem_gib"] > 0 and r["warmup_s"] > 0 for r in measured)


def test_smoke_run_covers_the_side_by_side_cases_under_one_set_of_flags(smoke_run):
    records = _lines(smoke_run / "results.jsonl")
    cases = {(r["step"], r["impl"], r["case"], r["variant"]) for r in records if r["bench"] == "train_step"}
    assert {
        ("pre_klvae", "klvae", "pre", "default"),
        ("pre_klvae", "klvae", "pre", "plain"),
        ("pre_diffusers", "diffusers-eager", "pre", "diffusers-eager"),
        ("gan_klvae", "klvae", "post-alternate", "default"),
        ("gan_klvae", "klvae", "post-every_batch", "plain"),
        ("gan_diffusers", "diffusers-eager", "post-alternate", "diffusers-eager"),
        ("train_512", "klvae", "pre", "default+gradient_checkpointing=true"),
    } <= cases
    decode = {r["mode"] for r in records if r["step"] == "decode_1024"}
    assert decode == {"whole", "tiled-32"}
    flags = {json.dumps(r["backend_flags"]) for r in records if "backend_flags" in r}
    assert flags == {json.dumps({"cudnn_benchmark": True, "tf32": True})}
    assert {r["perceptual_backbone"] for r in records if r["bench"] == "train_step"} == {"random"}
    # The same pre-GAN loss on the same network: klvae and diffusers count the same FLOPs (to 1 %).
    pre = {
        r["impl"]: r["flops_per_iter"] for r in records if r.get("case") == "pre" and r["resolution"] == 32
    }
    assert abs(pre["klvae"] / pre["diffusers-eager"] - 1) < 0.01
    tests = next(r for r in records if r["bench"] == "pytest")
    assert tests["skipped"] >= 2 and tests["failed"] == tests["errors"] == 0  # CUDA tests, no CUDA here


def test_smoke_summary_has_every_step_and_the_comparisons(smoke_run):
    text = (smoke_run / "summary.md").read_text()
    assert "Smoke run on a CPU" in text and "VGG-LPIPS: random" in text
    for step in STEPS:
        assert f"| {step.name} | ok |" in text
    assert "| pre_klvae | klvae | pre | default | 1 | 32 |" in text
    assert "| decode-64 | tiled-32 |" in text
    table = text.split("## Same-run comparisons and targets")[1]
    assert "pre-GAN img/s: klvae default ÷ diffusers eager | " in table
    assert table.count("not measured") == 2  # only the compiled diffusers rows: eager-only on a CPU
    assert sorted(p.name for p in smoke_run.iterdir()) == [
        "env.json", "pytest.log", "results.jsonl", "steps.jsonl", "steps.log", "summary.md",
    ]  # fmt: skip


def test_steps_that_do_not_fit_the_budget_are_skipped_and_named(tmp_path):
    rc = gpu_check.main(["--out", str(tmp_path), "--budget", "5", "--wheels", str(tmp_path / "none")])
    assert rc == 0
    steps = _lines(tmp_path / "steps.jsonl")
    assert [s["status"] for s in steps] == ["skipped"] * len(STEPS)
    assert "needs 10s" in steps[0]["reason"]
    assert "| env | skipped (" in (tmp_path / "summary.md").read_text()


def test_a_new_step_is_one_entry(smoke_run, tmp_path):
    (record,) = [r for r in _lines(smoke_run / "results.jsonl") if r["step"] == "kl_term"]
    assert record["loss_params"]["kl_weight"] == 1e-5 and record["variant"] == "plain"
    assert "| kl_term | ok |" in (smoke_run / "summary.md").read_text()
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--smoke", "--only", "kl_terms", "--out", str(tmp_path)])


def _sleep_forever(argv):
    time.sleep(600)


@pytest.mark.parametrize("launcher", ["fork", "subprocess"])
def test_a_step_past_its_limit_is_killed(tmp_path, monkeypatch, launcher):
    t0 = time.monotonic()
    if launcher == "fork":
        monkeypatch.setattr(gpu_check, "_entry_point", lambda script: _sleep_forever)
        outcome = gpu_check.run_forked("train_step", [], 1.0, tmp_path)
    else:
        command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]
        outcome = gpu_check.run_subprocess(command, 1.0, tmp_path, {})
    assert outcome.rc == 124 and time.monotonic() - t0 < 30


def test_the_script_runs_as_users_start_it(tmp_path):
    # The GPU launcher: `python benchmarks/gpu_check.py`, each step a fresh `python -m benchmarks.<script>`.
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--launcher", "subprocess", "--only",
         "decode_1024", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + (tmp_path / "steps.log").read_text()
    assert "| decode_1024 | ok |" in done.stdout
    assert {r["mode"] for r in _lines(tmp_path / "results.jsonl")} == {"whole", "tiled-32"}


def test_pytest_counts_are_read_from_its_last_line():
    record = gpu_check.pytest_record("....\n3 passed, 1 failed, 2 skipped, 1 error in 12.3s\n", 1, 12.3)
    assert (record["passed"], record["failed"], record["skipped"], record["errors"]) == (3, 1, 2, 1)
    assert gpu_check.pytest_record("", 5, 0.1)["passed"] == 0


@pytest.mark.slow
def test_smoke_run_with_aot_eager_goes_through_the_compiled_paths(tmp_path):
    # What a GPU run compiles (klvae's default variant, diffusers' compiled flavour, the GAN step's λ
    # through a compiled decoder with donated buffers off), compiled on the CPU with aot_eager.
    steps = "pre_klvae,pre_diffusers,gan_diffusers"
    argv = ["--smoke", "--compile-backend", "aot_eager", "--only", steps, "--out", str(tmp_path),
            "--perceptual-backbone", "random"]  # fmt: skip
    assert gpu_check.main(argv) == 0, (tmp_path / "steps.log").read_text()
    records = _lines(tmp_path / "results.jsonl")
    compiled = {(r["impl"], r["case"]) for r in records if r["optimizations"].get("compile")}
    assert compiled == {
        ("klvae", "pre"),
        ("diffusers-compiled", "pre"),
        ("diffusers-compiled", "post-alternate"),
    }
    gan = next(r for r in records if r["impl"] == "diffusers-compiled" and r["case"] == "post-alternate")
    assert (
        gan["optimizations"]["donated_buffer"] is False
        and gan["optimizations"]["compile_backend"] == "aot_eager"
    )
    assert "klvae default ÷ diffusers compiled | not measured" not in (tmp_path / "summary.md").read_text()
