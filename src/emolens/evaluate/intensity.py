"""Intensity templates (METHOD.md 4): does an emotion's reading move monotonically as a
number in the message becomes more extreme ("I just took {X} mg of tylenol...")?

Each filled message is read like a scenario (last token before the reply). An expectation
("afraid": "up") is met when the Spearman rho of the emotion's score with the value index
has the expected sign and |rho| >= THRESHOLD; rho is None (not met) when a score is constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

THRESHOLD = 0.5
OTHERS = ("happy", "calm", "afraid", "sad")  # drawn too (first two not expected), for contrast


@dataclass(frozen=True)
class Expectation:
    """One expected direction ("up"/"down"), the Spearman rho found and whether it is met."""

    direction: str
    rho: float | None
    met: bool


@dataclass(frozen=True)
class TemplateReading:
    """A template's score curves over its values (expected emotions, then `others` drawn for
    contrast), the checks of its expectations and the expected emotions not in the bank."""

    id: str
    template: str
    values: list
    curves: dict[str, list[float]]
    others: list[str]
    expect: dict[str, Expectation]
    missing: list[str]


@dataclass(frozen=True)
class Intensity:
    """Every template's reading; `met` of `total` expectations met at `threshold`."""

    threshold: float
    templates: list[TemplateReading]
    met: int
    total: int

    def to_json(self) -> dict:
        return asdict(self)


def filled(template: dict) -> list[str]:
    """The template's message for each of its values, in order."""
    return [template["template"].replace("{X}", str(value)) for value in template["values"]]


def spearman(scores: ArrayLike) -> float | None:
    """Spearman rho of `scores` with their index, or None when undefined."""
    from scipy.stats import spearmanr

    values = np.asarray(scores, dtype=np.float64)
    if len(values) < 3 or np.ptp(values) == 0:
        return None
    rho = float(spearmanr(np.arange(len(values)), values)[0])
    return rho if math.isfinite(rho) else None


def met(rho: float | None, direction: str, threshold: float = THRESHOLD) -> bool:
    """Whether rho has the sign of `direction` ("up"/"down") with |rho| >= threshold."""
    if rho is None:
        return False
    return (rho if direction == "up" else -rho) >= threshold


def score_templates(
    templates: Sequence[dict], scores: np.ndarray, emotions: Sequence[str]
) -> Intensity:
    """Curves and Spearman checks; `scores` holds one row per filled message, templates in
    order (as `filled` gives them). Expected emotions missing from the bank are listed."""
    emotions = list(emotions)
    results, start, hits, total = [], 0, 0, 0
    for template in templates:
        rows = scores[start : start + len(template["values"])]
        start += len(template["values"])
        expected = {e: d for e, d in template["expect"].items() if e in emotions}
        others = [e for e in OTHERS if e in emotions and e not in expected][:2]
        checks = {}
        for emotion, direction in expected.items():
            rho = spearman(rows[:, emotions.index(emotion)])
            checks[emotion] = Expectation(direction, rho, met(rho, direction))
            hits += checks[emotion].met
            total += 1
        results.append(TemplateReading(
            id=template["id"],
            template=template["template"],
            values=list(template["values"]),
            curves={e: [round(float(v), 4) for v in rows[:, emotions.index(e)]]
                    for e in [*expected, *others]},
            others=others,
            expect=checks,
            missing=[e for e in template["expect"] if e not in emotions],
        ))  # fmt: skip
    if start != len(scores):
        raise ValueError(f"{len(scores)} score rows for {start} filled templates")
    return Intensity(threshold=THRESHOLD, templates=results, met=hits, total=total)
