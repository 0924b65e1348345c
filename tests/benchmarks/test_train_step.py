"""benchmarks/train_step.py: one set of backend flags for every case; loss parameters reach the loss."""

from __future__ import annotations

import torch

from benchmarks.train_step import build_parser, case_flags, klvae_options, loss_params

CPU = torch.device("cpu")


def _args(*argv: str):
    args = build_parser().parse_args(list(argv))
    args.loss_params = dict(args.loss_param)
    return args


def test_cudnn_benchmark_flag_overrides_every_variant_and_diffusers():
    args = _args("--cudnn-benchmark", "true", "--tf32")
    opts = klvae_options(args, "plain")  # plain turns cudnn.benchmark off by itself
    assert opts.cudnn_benchmark is True
    for own_choice in (False, None):  # a klvae variant's own switch, diffusers (None)
        assert case_flags(args, CPU, own_choice).to_dict() == {"cudnn_benchmark": True, "tf32": True}
    assert case_flags(_args(), CPU, False).to_dict() == {"cudnn_benchmark": False, "tf32": False}


def test_aot_eager_backend_compiles_what_a_gpu_run_compiles():
    args = _args("--compile-backend", "aot_eager")
    default, plain = klvae_options(args, "default"), klvae_options(args, "plain")
    assert default.compile is True and default.compile_backend == "aot_eager"
    assert plain.compile is False  # plain stays eager
    assert klvae_options(_args(), "default").compile is None  # inductor: the device decides


def test_loss_params_are_yaml_values_on_top_of_the_recipe():
    args = _args("--loss-param", "kl_weight=1.0e-5", "--loss-param", "disc_loss=vanilla")
    params = loss_params(args, "post-alternate")
    assert params["kl_weight"] == 1e-5 and params["disc_loss"] == "vanilla"
    assert params["disc_start"] == 0 and params["perceptual_backbone"] == "random"
    assert loss_params(_args(), "pre")["disc_start"] == 10**9
