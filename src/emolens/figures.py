"""Saving matplotlib figures, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emolens.atomic import atomic_path
from emolens.errors import EmolensError

IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def check_output(path: str | os.PathLike | None, image: bool = False) -> None:
    """Refuse an output path that cannot be written: a directory, or an image of an unknown
    type. None passes (no output asked for)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir() or path.name in ("", ".", ".."):
        raise EmolensError(f"{path}: is a directory; give a file name")
    if image and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise EmolensError(f"{path}: unknown image type; use {', '.join(IMAGE_SUFFIXES)}")


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write `figure` (a PNG, SVG, PDF or JPEG by the suffix), release it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        check_output(path, image=True)
        with atomic_path(path) as staging:
            figure.savefig(staging, dpi=dpi, bbox_inches="tight", format=path.suffix[1:].lower())
    finally:
        plt.close(figure)
    return path
