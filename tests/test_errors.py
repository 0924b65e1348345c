"""Every user error is one line and exit status 2, at every stage; bugs keep their traceback.

Stages: config values (type-checked against the constructors), data setup, the start of fit (nothing
decodes), resume (damaged or incompatible checkpoints), disk errors (full, read-only); and the side tools.
A failed start leaves no run directory behind.
"""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import pytest
import torch

from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args
from tests.data.conftest import encode, random_image
from tests.training.test_cli import shard_config


def one_error_line(capsys, prefix: str = "error: ") -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if prefix in line]
    assert len(errors) == 1 and errors[0].startswith(prefix), err[-10:]
    assert "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.params.lossconfig.params.kl_weight=abc"], "parameter 'kl_weight' must be float, got 'abc'"),
        (["data.params.batch_size=two"], "data.params.batch_size, got 'two'"),
        (["data.params.size=33"], "data.params.size=33 is not a multiple of the autoencoder's downsampling"),
        (
            ["data.params.buckets={step: 3}"],
            "data.params.buckets.step=3 is not a multiple of the autoencoder's",
        ),
        (
            ["data.params.phases=[{iterations: 2, size: 33}, {size: 32}]"],
            "data.params.phases[0].size=33 is not a",
        ),
        (["data.params.phases=[{size: 32, iters: 2}]"], "phases[0]: unknown key(s) ['iters']"),
        (["data.params.buckets={step: 8}", "data.params.resize_to=48"], "cannot be combined with buckets"),
        (["data.params.train_dir=/no/such/folder"], "image folder '/no/such/folder' does not exist"),
        (["data.params.train_dir=???"], "config key data.params.train_dir: Missing mandatory value"),
        (["lightning.checkpoint.every_n_iterations=-1"], "every_n_iterations must be a non-negative integer"),
        (["lightning.max_iterations=abc"], "max_iterations must be"),
        (["model.params.accumulate_grad_batches=x"], "accumulate_grad_batches must be an int"),
        (["--gpus", "0,"], "--gpus '0,': no CUDA GPU is visible"),
        # Before: Adam's own ValueError at the start of fit / a format string's ValueError, with tracebacks.
        (
            ["model.base_learning_rate=-2e-4"],
            "model.base_learning_rate must be a number > 0 (e.g. 4.5e-6), got -0.0002",
        ),
        (
            ["model.base_learning_rate=abc"],
            "model.base_learning_rate must be a number > 0 (e.g. 4.5e-6), got 'abc'",
        ),
        (["--no-scale_lr", "model.base_learning_rate=abc"], "model.base_learning_rate must be a number > 0"),
        (
            ["model.base_learning_rate=null", "model.params.learning_rate=0"],
            "model.params.learning_rate must be a number > 0",
        ),
        (["model.params.lr_g_factor=-1"], "lr_g_factor must be > 0, got -1"),
        (["model.params.adam_betas=[1.5,0.9]"], "adam_betas must be two numbers in [0, 1), got [1.5, 0.9]"),
        # Before: a RuntimeError inside the discriminator's first convolution.
        (["model.params.ddconfig.out_ch=1"], "ddconfig.out_ch=1 must equal ddconfig.in_channels=3"),
    ],
)
def test_bad_config_is_one_line_and_leaves_no_run_dir(photos, tmp_path, capsys, overrides, message):
    if torch.cuda.is_available() and "--gpus" in overrides:
        pytest.skip("this machine has a GPU")
    logdir = tmp_path / "logs"
    assert main(tiny_args(photos, logdir, *overrides)) == 2
    assert message in one_error_line(capsys)
    assert not logdir.exists() or not list(logdir.iterdir())  # a failed start leaves nothing behind


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.params.image_key=img"],
            "batch has no key 'image' (keys: ['__key__', 'img']); set model.params.image_key",
        ),
        (
            ["model.params.ddconfig.in_channels=1", "model.params.ddconfig.out_ch=1"],
            "batch['image'] must be (B, 1, H, W) float in [-1, 1] (model.params.ddconfig.in_channels), got shape "
            "(2, 3, 32, 32); set in_channels to the images' channels (3 for RGB)",
        ),
    ],
)
def test_data_that_does_not_fit_the_model_is_one_line_at_the_first_batch(
    photos, tmp_path, capsys, overrides, message
):
    # The model and the data each build; the mismatch shows in the first batch (before: KeyError/ValueError
    # with a traceback from AutoencoderKL.get_input).
    assert main(tiny_args(photos, tmp_path / "logs", *overrides)) == 2
    assert message in one_error_line(capsys)


def test_logdir_that_is_a_file_is_one_line(photos, tmp_path, capsys):
    (tmp_path / "logs").write_text("not a folder")  # before: FileExistsError with a traceback
    assert main(tiny_args(photos, tmp_path / "logs")) == 2
    assert f"--logdir '{tmp_path / 'logs'}' is an existing file" in one_error_line(capsys)


def test_user_error_with_traceback_flag_raises(photos, tmp_path):
    from klvae.errors import ConfigError

    with pytest.raises(ConfigError, match="kl_weight"):
        main(
            tiny_args(
                photos, tmp_path / "logs", "--traceback", "model.params.lossconfig.params.kl_weight=abc"
            )
        )


def test_a_bug_inside_klvae_keeps_its_traceback(photos, tmp_path, monkeypatch):
    import klvae.training.launch

    def buggy(*args, **kwargs):
        return {}["no such key"]  # a KeyError from code is a bug, not a config error

    monkeypatch.setattr(klvae.training.launch, "scale_learning_rate", buggy)
    with pytest.raises(KeyError):
        main(tiny_args(photos, tmp_path / "logs"))


def _bad_folder(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(b"\x89PNG not really")
    return folder


def test_training_folder_where_nothing_decodes_fails_in_one_line(tmp_path, capsys):
    folder = _bad_folder(tmp_path)
    assert main(tiny_args(folder, tmp_path / "logs", "data.params.num_workers=1")) == 2
    line = one_error_line(capsys)
    assert "images in a row could not be used" in line and "first error" in line


def test_min_size_above_every_image_fails_instead_of_hanging(photos, tmp_path, capsys):
    assert main(tiny_args(photos, tmp_path / "logs", "data.params.min_size=1000")) == 2
    assert "below min_size 1000" in one_error_line(capsys)


def test_webdataset_source_where_nothing_decodes_names_the_source(tmp_path, capsys):
    config = shard_config(tmp_path, [[{"__key__": f"{i}", "jpg": b"\xff\xd8 broken"} for i in range(5)]])
    assert main(["-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test",
                 "lightning.trainer.enable_progress_bar=false", "lightning.checkpoint.save_top_k=0"]) == 2  # fmt: skip
    line = one_error_line(capsys)
    assert "0 of 5 samples in train source 0 decoded; first error: corrupt_image" in line, line


def test_webdataset_pattern_matching_nothing_is_one_line(tmp_path, capsys):
    config = shard_config(tmp_path, [[{"__key__": "0", "jpg": encode(random_image(0, 40, 48))}]])
    args = ["-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--logger", "csv"]
    assert main([*args, f"data.params.train.shards={tmp_path}/nope-{{000..003}}.tar"]) == 2
    assert "do not exist" in one_error_line(capsys)
    assert not (tmp_path / "logs").exists()


def test_unreadable_validation_shards_fail_instead_of_validating_nothing(tmp_path, capsys):
    config = shard_config(
        tmp_path, [[{"__key__": f"{i}", "jpg": encode(random_image(i, 40, 48))} for i in range(8)]]
    )
    (tmp_path / "val.tar").write_bytes(b"this is not a tar file" * 100)
    args = ["-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--logger", "csv", "--no-test",
            f"data.params.validation.shards={tmp_path}/val.tar", "lightning.trainer.enable_progress_bar=false"]  # fmt: skip
    assert main(args) == 2
    assert "samples in the validation shards" in one_error_line(capsys)


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_previous(
    photos, tmp_path, capsys, monkeypatch
):
    import klvae.io.checkpoints as ck

    real_save, calls = ck.torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the first checkpoints fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", f)))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", save)
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.checkpoint.save_top_k=0")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "free disk space" in line
    ckpts = only_run_dir(tmp_path / "logs") / "checkpoints"
    assert ck.checkpoint_problem(ckpts / "last.ckpt") is None  # the last good one is intact
    assert not list(ckpts.glob(".*.tmp"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only): a real full disk, not a simulated ``OSError``."""
    import os
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_really_full_disk_is_one_line_and_keeps_a_loadable_checkpoint(photos, small_tmpfs, capsys):
    import klvae.io.checkpoints as ck

    # A tiny model's checkpoint is ~0.7 MB: last.ckpt, its temp copy and iter_*.ckpt do not all fit in 2 MiB.
    args = tiny_args(
        photos, small_tmpfs / "logs", "lightning.checkpoint.save_top_k=0", "lightning.max_iterations=12"
    )
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "free disk space" in line
    ckpts = only_run_dir(small_tmpfs / "logs") / "checkpoints"
    assert ck.checkpoint_problem(ckpts / "last.ckpt") is None  # the last good one is intact
    assert not list(ckpts.glob(".*.tmp"))  # the half-written temp file was removed


def test_read_only_logdir_is_one_line(photos, tmp_path, capsys, monkeypatch):
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(tiny_args(photos, tmp_path / "ro" / "logs")) == 2
    assert "Read-only file system" in one_error_line(capsys)


def test_resume_errors_are_one_line(photos, tmp_path, capsys):
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=2")) == 0
    run = only_run_dir(tmp_path / "logs")
    capsys.readouterr()
    # -r CKPT without -t and with --no-test: nothing would happen; say so.
    assert main(["-r", str(run / "checkpoints" / "last.ckpt"), "--no-test", "--logger", "csv"]) == 2
    assert "nothing to do" in one_error_line(capsys)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["-r", ckpt, "--logger", "csv", "data.params.val_dir=null"]) == 2  # nothing to evaluate on
    assert "has no validation split" in one_error_line(capsys)
    # An incompatible model (another width) fails before Lightning's state-dict traceback.
    assert main(["-t", "-r", str(run), "--logger", "csv", "model.params.ddconfig.ch=16"]) == 2
    assert "does not fit the model the config builds" in one_error_line(capsys)


def test_resume_from_a_run_whose_saved_config_is_not_yaml_is_one_line(photos, tmp_path, capsys):
    assert main(tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=1")) == 0
    run = only_run_dir(tmp_path / "logs")
    (config,) = (run / "configs").glob("*-project.yaml")
    config.write_text("model: [unclosed\n  params: {\n")  # before: yaml's ScannerError with a traceback
    capsys.readouterr()
    assert main(["-t", "-r", str(run), "--logger", "csv", "lightning.max_iterations=2"]) == 2
    line = one_error_line(capsys)
    assert f"config file '{config}' is not valid YAML" in line and "move it out of configs/" in line
    config.write_text("- a list\n- not a mapping\n")
    assert main(["-t", "-r", str(run), "--logger", "csv"]) == 2
    assert "must hold a mapping, got list" in one_error_line(capsys)


@pytest.mark.parametrize(
    "tool", ["klvae.interop.export", "klvae.evaluation.evaluate", "klvae.evaluation.latent_stats"]
)
def test_side_tools_on_bad_checkpoints_are_one_line(tool, tmp_path, capsys):
    import importlib

    tool_main = importlib.import_module(tool).main
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    (tmp_path / "imgs").mkdir()
    extra = {"klvae.interop.export": ["--format", "ldm", "--out", str(tmp_path / "o.safetensors")],
             "klvae.evaluation.evaluate": ["--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "e")],
             "klvae.evaluation.latent_stats": ["--data", str(tmp_path / "imgs")]}[tool]  # fmt: skip
    prog = {
        "klvae.interop.export": "klvae-export",
        "klvae.evaluation.evaluate": "klvae-eval",
        "klvae.evaluation.latent_stats": "klvae-latent-stats",
    }
    for ckpt in (tmp_path / "missing.ckpt", garbage):
        assert tool_main([str(ckpt), *extra, "--lpips", "none", "--inception", "none"] if tool == "klvae.evaluation.evaluate"
                         else [str(ckpt), *extra]) == 2  # fmt: skip
        line = one_error_line(capsys, f"{prog[tool]}: error: ")
        assert str(ckpt) in line, line


def test_make_shards_bad_input_is_one_line(tmp_path, capsys):
    from klvae.data.make_shards import main as make_shards

    assert make_shards([str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "nothing-here" in one_error_line(capsys, "klvae-make-shards: error: ")


def test_make_shards_out_naming_a_file_is_one_line(photos, tmp_path, capsys):
    from klvae.data.make_shards import main as make_shards

    (tmp_path / "out").write_text("a file")  # before: FileExistsError with a traceback
    assert make_shards([str(photos), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"output folder '{tmp_path / 'out'}' is an existing file" in one_error_line(
        capsys, "klvae-make-shards: error: "
    )


def test_a_diverging_run_stops_with_one_line_and_keeps_finite_checkpoints(photos, tmp_path, capsys):
    logdir = tmp_path / "logs"
    # One Adam step at lr 1e30 moves every weight by ~1e30: the next losses overflow to inf/NaN.
    args = tiny_args(
        photos, logdir, "model.base_learning_rate=1e30", "model.params.max_nonfinite_in_a_row=2",
        "lightning.max_iterations=12",
    )  # fmt: skip
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "updates in a row had a non-finite loss or gradient" in line and "learning_rate" in line
    ckpts = sorted((only_run_dir(logdir) / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the iterations before the divergence are checkpointed"
    assert not [c for c in ckpts if "nan" in c.name], (
        "a NaN val/rec_loss is never ranked as a best checkpoint"
    )
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt
