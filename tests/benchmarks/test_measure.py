"""benchmarks/measure.py: the same backend flags before every case; the summary of per-iteration times."""

from __future__ import annotations

import math

import torch

from benchmarks.measure import BackendFlags, set_backend_flags, summarize


def test_backend_flags_are_set_for_every_case():
    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        set_backend_flags(BackendFlags(cudnn_benchmark=True, tf32=True))
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        set_backend_flags(BackendFlags(cudnn_benchmark=False, tf32=False))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = before


def test_summarize_reports_spread_mfu_and_the_warmup_excess_as_compile_time():
    out = summarize(
        [0.1, 0.2, 0.3], batch=12, flops_per_iter=4e12, peak_tflops=100.0, warmup_times=[2.0, 0.2]
    )
    assert out["ms_per_iter"] == 200.0 and out["ms_per_iter_median"] == 200.0
    assert (out["ms_per_iter_min"], out["ms_per_iter_max"]) == (100.0, 300.0)
    assert math.isclose(out["img_per_s"], 60.0) and math.isclose(out["mfu"], 0.2)
    assert math.isclose(out["compile_s"], 2.2 - 2 * 0.2)  # warm-up minus as many median iterations
    assert summarize([0.1], batch=1, flops_per_iter=None, peak_tflops=None)["mfu"] is None
