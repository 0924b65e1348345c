"""ImageLogger(val_image_dir=...): the user's own validation images, reconstructed at native resolution."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from klvae.callbacks import ImageLogger
from tests.models.test_autoencoder import fit, make_model


def test_val_image_folder_is_logged_at_native_resolution(tiny_ddconfig, tiny_lossconfig, tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (44, 61, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (72, 40), dtype=np.uint8)).save(folder / "sub" / "grey.jpg")
    logger = ImageLogger(tmp_path / "images", every_n_iterations=0, val_image_dir=folder)
    model = make_model(tiny_ddconfig, tiny_lossconfig, ema_decay=0.9)
    fit(model, 2, [logger], val_batches=1)
    written = sorted((tmp_path / "images" / "val_folder").iterdir())
    assert [p.name for p in written] == ["grey_it00000002.png", "wide_it00000002.png"]
    # input | reconstruction side by side, each cropped to multiples of 8 (not resized), 2-px gaps
    assert Image.open(written[1]).size == (2 * (56 + 2), 40 + 2)
    assert Image.open(written[0]).size == (2 * (40 + 2), 72 + 2)


def test_empty_val_image_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        ImageLogger(tmp_path, val_image_dir=tmp_path)


def test_val_image_dir_is_a_lightning_image_logger_option(tmp_path):
    from klvae.training.trainer import plan_trainer

    lightning = {
        "max_iterations": 2,
        "image_logger": {"every_n_iterations": 1, "val_image_dir": str(tmp_path)},
    }
    plan = plan_trainer(lightning, gpus=None, num_nodes=None, precision=None, accumulate=1)
    assert plan.image_logger["val_image_dir"] == str(tmp_path)
