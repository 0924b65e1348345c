"""The photographs bundled with scikit-image, as files: demo and benchmark input without a download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SKIMAGE_PHOTOS", "skimage_photo_paths"]

# Real photographs (not charts, masks or synthetic patterns) shipped inside the scikit-image wheel;
# camera, coins, moon, page, grass, gravel, brick are greyscale (converted to RGB by the writers).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)


def skimage_photo_paths() -> list[Path]:
    """Paths of the bundled photographs that exist in the installed scikit-image.

    Raises:
        ValueError: scikit-image is not installed (``pip install scikit-image``, or the ``demo`` extra).
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("scikit-image is not installed; install it with: pip install 'klvae[demo]'")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = [data_dir / name for name in SKIMAGE_PHOTOS if (data_dir / name).is_file()]
    if not paths:
        raise ValueError(f"no bundled photographs found in {data_dir}; is scikit-image complete?")
    return paths
