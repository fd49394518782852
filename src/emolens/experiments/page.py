"""Experiment pages: one self-contained HTML file per summary (see `emolens.pages`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from emolens.pages import document, esc, image, table

__all__ = ["esc", "experiment_page", "image", "interval", "table"]


def interval(estimate: dict | None, digits: int = 2, percent: bool = False) -> str:
    """ "value [low, high]" of an Estimate's JSON, "n/a" where undefined."""
    if not estimate or estimate.get("value") is None:
        return "n/a"

    def show(x: float | None) -> str:
        if x is None:
            return "?"
        return f"{x:.{digits - 1}%}" if percent else f"{x:+.{digits}f}"

    if estimate.get("low") is None:
        return show(estimate["value"])
    return f"{show(estimate['value'])} [{show(estimate['low'])}, {show(estimate['high'])}]"


def experiment_page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole page: a title, an introduction and (heading, HTML) sections."""
    body = "".join(f"<h2>{esc(heading)}</h2>{content}" for heading, content in sections)
    return document(title, f"<h1>{esc(title)}</h1>{intro}{body}")


def default_page(name: str, summary: dict, figures: dict[str, Path]) -> str:
    """A plain page: every figure, then the summary as JSON."""
    shown = "".join(image(path, key) for key, path in figures.items())
    raw = f"<pre>{esc(json.dumps(summary, indent=1)[:200_000])}</pre>"
    return experiment_page(
        f"emolens experiment: {name}", "", [("Figures", shown), ("Summary", raw)]
    )
