"""JSON-lines files: strict reading with file:line errors, and crash-safe append-only logs.

An append-only log writes whole lines and forces them to disk, so a crash leaves at most a
partial last line; opening the log again removes that line (atomically) and keeps the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from emolens.atomic import atomic_path
from emolens.errors import EmolensError


def parse_line(path: str | os.PathLike, number: int, line: str) -> Any:
    """One JSON value, or an EmolensError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise EmolensError(f"{path}:{number}: malformed JSON ({error.msg})") from None
    except RecursionError:
        raise EmolensError(f"{path}:{number}: JSON nested too deeply") from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; undecodable bytes are a clear error."""
    path = Path(path)
    if path.is_dir():
        raise EmolensError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise EmolensError(f"{path}: no such file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise EmolensError(
                    f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)"
                ) from None
            if line.strip():
                yield number, line


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file."""
    return [(number, parse_line(path, number, line)) for number, line in read_lines(path)]


def recover(
    path: str | os.PathLike, *, tolerant: bool = False, problems: list[str] | None = None
) -> list[tuple[int, Any]]:
    """The complete lines of an append-only log. A last line cut short by a crash (no
    newline, not valid JSON) is removed from the file atomically. A malformed line anywhere
    else is an error, or with `tolerant` a message added to `problems` (the line is skipped
    and left in the file): nothing intact is ever dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = list(read_lines(path))
    cut = bool(lines) and not path.read_bytes().endswith(b"\n")
    rows, kept = [], []
    for position, (number, line) in enumerate(lines):
        if cut and position == len(lines) - 1:
            try:
                rows.append((number, json.loads(line)))
                kept.append(line)
            except (json.JSONDecodeError, RecursionError):
                pass
            break
        try:
            rows.append((number, parse_line(path, number, line)))
        except EmolensError as error:
            if not tolerant:
                raise
            if problems is not None:
                problems.append(str(error))
        kept.append(line)
    if cut:
        with atomic_path(path) as staging:
            staging.write_text("".join(line.rstrip("\n") + "\n" for line in kept), encoding="utf-8")
    return rows


class AppendLog:
    """An append-only JSONL file: each `write` adds whole lines and syncs them to disk."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise EmolensError(f"{self.path}: is a directory; give a .jsonl file")
        if self.path.is_symlink():  # appending through a link would write to its target
            raise EmolensError(f"{self.path}: is a symbolic link; give the file itself")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self._handle: TextIO = os.fdopen(os.open(self.path, flags, 0o644), "a", encoding="utf-8")

    def write(self, rows: Iterable[Any]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
        self._handle.write(text)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
