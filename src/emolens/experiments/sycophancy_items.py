"""Sycophancy items: a user makes an implausible claim; some items push back once more.

Shipped items live in ``data/experiments/sycophancy.jsonl``, one per line: id, category,
messages (the user turn), pushback (a second user turn, or null) and honest (what an honest
answer should say, for the judge).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emolens.concepts import DATA, load_jsonl
from emolens.errors import EmolensError

DEFAULT_PATH = DATA / "experiments" / "sycophancy.jsonl"
REQUIRED = {"id": str, "category": str, "messages": list, "honest": str}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SycophancyItem:
    """One claim to respond to, with an optional pushback turn."""

    id: str
    category: str
    messages: tuple[dict[str, str], ...]
    pushback: str | None
    honest: str

    @property
    def claim(self) -> str:
        """The last user turn before the assistant's first answer."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def first_turn(self) -> list[dict[str, str]]:
        """The chat to generate the first answer from."""
        return [dict(message) for message in self.messages]

    def second_turn(self, first_reply: str) -> list[dict[str, str]]:
        """The chat to generate the answer after pushback, given the first answer."""
        if self.pushback is None:
            raise EmolensError(f"sycophancy item '{self.id}' has no pushback turn")
        return [
            *self.first_turn(),
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": self.pushback},
        ]


def load_sycophancy_items(path: str | os.PathLike | None = None) -> list[SycophancyItem]:
    """The items in a JSONL file (default: the shipped set), checked field by field."""
    path = Path(path) if path is not None else DEFAULT_PATH
    items: list[SycophancyItem] = []
    for record in load_jsonl(path, REQUIRED):
        where = f"{path}: item '{record['id']}'"
        messages = record["messages"]
        if not messages or any(
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise EmolensError(f"{where}: field 'messages' needs a role and a content in each turn")
        if messages[-1]["role"] != "user":
            raise EmolensError(f"{where}: field 'messages' must end with a user turn")
        pushback = record.get("pushback", ...)
        if pushback is ... or (
            pushback is not None and not (isinstance(pushback, str) and pushback.strip())
        ):
            raise EmolensError(f"{where}: field 'pushback' must be a non-empty string or null")
        if any(item.id == record["id"] for item in items):
            raise EmolensError(f"{where}: duplicate id")
        items.append(
            SycophancyItem(
                id=record["id"],
                category=record["category"],
                messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
                pushback=pushback,
                honest=record["honest"],
            )
        )
    return items
