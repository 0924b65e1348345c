"""The end-of-training summary, ``--export``, and the iteration progress bar that survives a resume."""

from __future__ import annotations

import logging

from klvae.training.cli import main
from tests.cli_helpers import only_run_dir, tiny_args, write_photos


def test_summary_export_and_progress_bar_over_iterations(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("KLVAE_RUN_DIR", raising=False)
    photos = write_photos(tmp_path / "photos")
    caplog.set_level(logging.INFO)
    args = tiny_args(photos, tmp_path / "logs", "lightning.max_iterations=3", "--export", "diffusers")
    args.remove("lightning.trainer.enable_progress_bar=false")
    assert main(args) == 0
    run = only_run_dir(tmp_path / "logs")
    assert (run / "export" / "diffusers" / "config.json").is_file()
    text = caplog.text
    assert "training done: 3 iterations" in text and "best checkpoint:" in text and "val/rec_loss" in text
    assert f"exported:        {run / 'export' / 'diffusers'}" in text
    assert "image grids:" in text
    err = capsys.readouterr().err
    assert "train: 100%" in err and "3/3" in err  # one bar over iterations with its total
    # Resumed, the bar starts where the run stands.
    assert main(["-t", "-r", str(run), "--logger", "csv", "--no-test", "lightning.max_iterations=4"]) == 0
    err = capsys.readouterr().err
    assert "4/4" in err and "0/4" not in err
