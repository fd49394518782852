"""Saving matplotlib figures as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write `figure` as a PNG (creating folders), release it, and return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path
