"""Self-contained HTML pages (the report, experiment pages): one style sheet, tables, and
figures inlined as data URIs, so a page makes no external request."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;display:block;margin:.8em 0}
.note{color:#555;font-size:.9em}.ok{color:#1a7f37}.no{color:#b42318}
code,pre{background:#f6f6f6;padding:.1em .3em}nav a{margin-right:1em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; cells are inserted as given (escape text first), the first `left`
    columns left-aligned."""

    def cell(tag: str, i: int, value: Any) -> str:
        align = ' class="l"' if i < left else ""
        return f"<{tag}{align}>{value}</{tag}>"

    head = "".join(cell("th", i, esc(h)) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: Path | None, alt: str) -> str:
    """A PNG inlined as a data URI ("" when there is no such file)."""
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def document(title: str, body: str) -> str:
    """A whole page with the shared style sheet."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )
