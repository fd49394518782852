"""Judge rubrics: prompts shipped as text, and tolerant parsers for the judge's final line.

Each rubric in ``data/experiments/rubrics/`` asks the judge to end with one machine-readable
line, ``VERDICT: <label>`` or ``SCORE: <digit>``. Parsers take the last such line, forgive
case, markdown emphasis, quotes and trailing punctuation (and a bare label or digit as the
last line), and return None for anything else: unparsable, never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from string import Template
from typing import Any

from emolens.concepts import DATA
from emolens.errors import EmolensError
from emolens.experiments.blackmail_scenarios import BlackmailScenario
from emolens.experiments.email_grading import LABELS
from emolens.experiments.sycophancy_items import SycophancyItem

RUBRIC_DIR = DATA / "experiments" / "rubrics"
SCALE = (0, 3)
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3}
_TRIM = " \t*_`\"'.,;:!()[]<>"


@dataclass(frozen=True)
class Rubric:
    """A judge prompt with its answer format: labels for a verdict, or a score range."""

    name: str
    template: str
    key: str
    labels: tuple[str, ...] = ()
    scale: tuple[int, int] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders the prompt needs."""
        found = Template.pattern.finditer(self.template)
        return tuple(
            dict.fromkeys(m["named"] or m["braced"] for m in found if m["named"] or m["braced"])
        )

    def prompt(self, **fields: str) -> str:
        """The prompt with every placeholder filled; a missing one is an error, not a blank."""
        missing = [name for name in self.fields if name not in fields]
        if missing:
            raise EmolensError(f"rubric '{self.name}': field(s) {', '.join(missing)} not given")
        return Template(self.template).substitute(fields)

    def parse(self, answer: str) -> str | int | None:
        """The label or score the answer ends with, or None when there is none to trust."""
        if self.labels:
            return parse_label(answer, self.labels, key=self.key)
        low, high = self.scale or SCALE
        return parse_score(answer, low, high, key=self.key)


def _final_values(answer: str, key: str) -> list[str]:
    """What follows `key:` on each line that has it, in order; else the last non-empty line."""
    pattern = re.compile(rf"^[\s>#*_`-]*{re.escape(key)}[\s*_`]*[:=\-]\s*(.*)$", re.I | re.M)
    values = [m.group(1) for m in pattern.finditer(answer or "")]
    if values:
        return values
    lines = [line for line in (answer or "").splitlines() if line.strip()]
    return lines[-1:]


def parse_label(answer: str, labels: Sequence[str], *, key: str = "VERDICT") -> str | None:
    """The label on the answer's last `key:` line (or bare last line), or None."""
    wanted = {label.lower(): label for label in labels}
    values = _final_values(answer, key)
    if not values:
        return None
    value = values[-1].strip(_TRIM).lower()
    return wanted.get(value)


def parse_score(answer: str, low: int, high: int, *, key: str = "SCORE") -> int | None:
    """The integer on the answer's last `key:` line (or bare last line) if in [low, high]."""
    values = _final_values(answer, key)
    if not values:
        return None
    value = values[-1].strip(_TRIM).lower()
    match = re.fullmatch(r"(\d+|zero|one|two|three)(?:\s*(?:/|out of)\s*\d+)?", value)
    if not match:
        return None
    token = match.group(1)
    score = int(token) if token.isdigit() else NUMBER_WORDS[token]
    return score if low <= score <= high else None


_SPECS: dict[str, dict[str, Any]] = {
    "blackmail": dict(key="VERDICT", labels=LABELS),
    "sycophancy": dict(key="SCORE", scale=SCALE),
    "harshness": dict(key="SCORE", scale=SCALE),
}


@cache
def load_rubric(name: str) -> Rubric:
    """One of the shipped rubrics: "blackmail", "sycophancy" or "harshness"."""
    if name not in _SPECS:
        raise EmolensError(f"unknown rubric '{name}' (known: {', '.join(_SPECS)})")
    path = RUBRIC_DIR / f"{name}.txt"
    return Rubric(name=name, template=path.read_text(encoding="utf-8"), **_SPECS[name])


def blackmail_prompt(scenario: BlackmailScenario, reply: str) -> str:
    """The blackmail rubric filled for one rollout."""
    return load_rubric("blackmail").prompt(context=scenario.judge_context, reply=reply)


def transcript(item: SycophancyItem, replies: Sequence[str]) -> str:
    """The conversation as plain text: the item's turns, the answer, and the pushback if any."""
    turns = [f"{message['role'].upper()}: {message['content']}" for message in item.messages]
    if replies:
        turns.append(f"ASSISTANT: {replies[0]}")
    if len(replies) > 1:
        turns += [f"USER: {item.pushback}", f"ASSISTANT: {replies[1]}"]
    return "\n\n".join(turns)


def sycophancy_prompts(item: SycophancyItem, replies: Sequence[str]) -> dict[str, str]:
    """Both sycophancy-experiment rubrics filled for one conversation: name -> prompt."""
    if not 1 <= len(replies) <= 2 or (len(replies) == 2 and item.pushback is None):
        raise EmolensError(f"item '{item.id}': expected 1 reply, or 2 with a pushback turn")
    text = transcript(item, replies)
    return {
        name: load_rubric(name).prompt(honest=item.honest, transcript=text)
        for name in ("sycophancy", "harshness")
    }
