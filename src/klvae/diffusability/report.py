"""The benchmark's files: sample grids, the one plot of every VAE's validation-loss curve, the JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from klvae.io.files import write_atomically

__all__ = ["save_curves_png", "save_sample_grid", "summary_table", "write_json"]

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
            (140, 86, 75), (227, 119, 194)]  # fmt: skip


def write_json(path: Path, record: Mapping[str, Any]) -> Path:
    """Atomically; NaN/inf are written as null (strict JSON any reader accepts)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(dict(record)), indent=2) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def save_sample_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Decoded samples (N, 3, H, W) in [-1, 1] as one PNG grid (at least 256 px wide: small images are
    enlarged with nearest-neighbour so 64² samples stay visible)."""
    from PIL import Image

    from klvae.callbacks.images import make_grid

    grid = Image.fromarray(make_grid(images, nrow=min(nrow, images.shape[0])))
    if grid.width < 512:
        factor = math.ceil(512 / grid.width)
        grid = grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_curves_png(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, size: tuple[int, int] = (720, 440),
                    title: str = "validation flow-matching loss (fixed sigmas, fixed noise)") -> Path:  # fmt: skip
    """One plot, one line per VAE: mean validation loss over σ against training step (log-scale y)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 30, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    points = [(p["step"], p["loss"]) for c in curves.values() for p in c if p["loss"] and p["loss"] > 0]
    if points:
        max_step = max(s for s, _ in points)
        lo, hi = math.log10(min(v for _, v in points)), math.log10(max(v for _, v in points))
        hi = hi if hi > lo else lo + 0.1
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = left + (w - right - left) * step / max(max_step, 1)
            y = top + (h - bottom - top) * (hi - math.log10(loss)) / (hi - lo)
            return x, y

        for i, (name, curve) in enumerate(curves.items()):
            colour = _COLOURS[i % len(_COLOURS)]
            line = [xy(p["step"], p["loss"]) for p in curve if p["loss"] and p["loss"] > 0]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for x, y in line:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            last = f": {curve[-1]['loss']:.4f}" if curve else ""
            draw.text((left + 8, top + 6 + 14 * i), f"{name}{last}", fill=colour)
        for frac in (0.0, 0.5, 1.0):
            value = 10 ** (hi - frac * (hi - lo))
            draw.text((4, top + frac * (h - bottom - top) - 6), f"{value:.3g}", fill="black")
        draw.text((left, h - bottom + 6), "0", fill="black")
        draw.text((w - right - 60, h - bottom + 6), f"{max_step} steps", fill="black")
    draw.text((left, h - 24), title + "; log y", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of the headline numbers, one row per VAE."""

    def fmt(v: Any, digits: int = 4) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"

    rows = [
        f"{'VAE':<20} {'gFID':>10} {'KID':>10} {'SWD':>9} {'recon SWD':>9} {'val loss':>9} {'EMA val':>9}"
    ]
    for r in results:
        s = r["signals"]
        gfid = fmt(s.get("gfid")) + ("*" if s.get("gfid_unreliable") else "")
        rows.append(f"{r['name']:<20} {gfid:>10} {fmt(s.get('kid')):>10} {fmt(s.get('swd')):>9} "
                    f"{fmt(s.get('recon_swd')):>9} {fmt(r['final_val_loss']):>9} {fmt(r['ema_val_loss']):>9}")  # fmt: skip
    if any(r["signals"].get("gfid_unreliable") for r in results):
        rows.append("* UNRELIABLE: fewer than 2,048 generated images (FID's feature dimension)")
    return "\n".join(rows)
