"""The 171 emotion concepts, the showcase set, forbidden words, topics and ratings (from data/)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from pathlib import Path

from emolens.errors import EmolensError

DATA = Path(str(files("emolens") / "data"))


def _lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content (a leading byte-order mark dropped); a missing file, a
    directory or bytes that are not UTF-8 raise an EmolensError naming the file and line."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise EmolensError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise EmolensError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def load_jsonl(path: Path, required: Mapping[str, type]) -> list[dict]:
    """Rows of a JSONL data file, each checked for required fields and types (file:line errors)."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EmolensError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        except RecursionError:
            raise EmolensError(f"{path}:{number}: malformed JSON (nested too deeply)") from None
        for name, kind in required.items():
            if not isinstance(row.get(name), kind):
                raise EmolensError(
                    f"{path}:{number}: field '{name}' missing or not {kind.__name__}"
                )
        rows.append(row)
    return rows


@cache
def emotions() -> list[str]:
    """The 171 emotion concepts in the study's order."""
    return _lines("emotions.txt")


@cache
def showcase() -> list[str]:
    """The 12 emotions the study's figures feature."""
    return _lines("showcase.txt")


@cache
def topics() -> list[str]:
    """Everyday, valence-ambiguous story topics."""
    return _lines("topics.txt")


@cache
def forbidden() -> dict[str, tuple[str, ...]]:
    """For each emotion: the word, its inflections and derived forms, and direct synonyms."""
    path = DATA / "forbidden.jsonl"
    rows = load_jsonl(path, {"emotion": str, "forbidden": list})
    table = {row["emotion"]: tuple(row["forbidden"]) for row in rows}
    missing = set(emotions()) - set(table)
    if missing:
        raise EmolensError(f"{path}: no forbidden words for {sorted(missing)[:5]}")
    return table


def ratings(path: str | os.PathLike | None = None) -> dict[str, tuple[float, float]]:
    """Valence and arousal (1-7) per word from a CSV with columns word, valence, arousal.

    Without a path: the shipped judge ratings of all 171 emotions.
    """
    path = Path(path) if path is not None else DATA / "ratings.csv"
    if not path.is_file():
        raise EmolensError(f"{path}: no such ratings file")
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        if not {"word", "valence", "arousal"} <= fields:
            raise EmolensError(
                f"{path}:1: header must name the columns word, valence, arousal "
                f"(found {', '.join(reader.fieldnames or []) or 'nothing'})"
            )
        table = {}
        try:
            for row in reader:
                values = []
                for field in ("valence", "arousal"):
                    try:
                        value = float(row[field])
                    except (TypeError, ValueError):
                        value = math.nan
                    if not math.isfinite(value):
                        raise EmolensError(
                            f"{path}:{reader.line_num}: field '{field}' is not a finite number: "
                            f"{row[field]!r}"
                        )
                    values.append(value)
                word = (row["word"] or "").strip().lower()
                if not word:
                    raise EmolensError(f"{path}:{reader.line_num}: field 'word' is empty")
                table[word] = (values[0], values[1])
        except csv.Error as error:
            raise EmolensError(
                f"{path}:{reader.line_num}: not a readable CSV row ({error})"
            ) from None
    if not table:
        raise EmolensError(f"{path}: no ratings")
    return table
