"""Summary pieces the scenario studies share: pure functions of result rows (conditions,
dose-response curves, judge agreement, readout correlations, timing) and the dose-response
figure."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from emolens.errors import EmolensError
from emolens.experiments.agreement import cohen_kappa
from emolens.experiments.intervals import correlation
from emolens.figures import save_figure

UNSTEERED = "unsteered"


def by_condition(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by condition name, unsteered first, then in the order first seen."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["condition"]["name"] != UNSTEERED):
        groups.setdefault(row["condition"]["name"], []).append(row)
    return groups


def condition_fields(row: dict) -> dict:
    """{condition, emotion, strength, layers, positions} of a row (emotion None unless one
    emotion is steered)."""
    condition = row["condition"]
    steer = condition["steer"]
    emotion, strength = next(iter(steer.items())) if len(steer) == 1 else (None, 0.0)
    return {"condition": condition["name"], "emotion": emotion, "strength": strength,
            "layers": condition["layers"], "positions": condition["positions"]}  # fmt: skip


def dose_curves(entries: Sequence[dict], *keys: str) -> dict[str, list]:
    """Per steered emotion (with "@layers" where given), the points {strength, condition,
    value, low, high, n} of the Estimate's JSON at `entry[key][key]...`, strength 0 being
    the unsteered entry."""
    base = next((e for e in entries if e["condition"] == UNSTEERED), None)
    curves: dict[str, list[dict]] = {}
    for entry in entries:
        if entry["emotion"] is None:
            continue
        key = entry["emotion"]
        if entry["layers"] is not None:
            key += "@" + "-".join(map(str, entry["layers"]))
        curves.setdefault(key, []).append(_point(entry, keys))
    if base is not None:
        for points in curves.values():
            points.append(_point(base, keys))
    return {key: sorted(points, key=lambda p: p["strength"]) for key, points in curves.items()}


def _point(entry: dict, keys: Sequence[str]) -> dict:
    estimate = entry
    for key in keys:
        estimate = estimate[key]
    return {"strength": entry["strength"], "condition": entry["condition"], **estimate}


def agreement(
    first: Sequence[Hashable | None],
    second: Sequence[Hashable | None],
    categories: Sequence[Hashable],
    weights: str | None = None,
) -> dict:
    """Cohen's kappa of two raters over the same items (None ratings left out), the share of
    exact agreement, and the confusion matrix (rows: `first`, columns: `second`)."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    confusion = [[sum(1 for a, b in pairs if (a, b) == (x, y)) for y in categories]
                 for x in categories]  # fmt: skip
    kappa = None
    if pairs:
        try:
            value = cohen_kappa([a for a, _ in pairs], [b for _, b in pairs], weights=weights,
                                categories=categories)  # fmt: skip
        except EmolensError:
            value = math.nan
        kappa = None if math.isnan(value) else round(value, 4)
    agree = sum(a == b for a, b in pairs)
    return {"kappa": kappa, "weights": weights, "n": len(pairs),
            "exact": round(agree / len(pairs), 4) if pairs else None,
            "categories": list(categories), "confusion": confusion}  # fmt: skip


def readings(rows: Sequence[dict], turn: int = -1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The readout's emotions, and per row the reading [rows, emotions] at the first position
    and averaged over the reply of its `turn`-th turn (nan where the reply was empty)."""
    emotions = rows[0]["readout"]["emotions"]
    first, mean = [], []
    for row in rows:
        if row["readout"]["emotions"] != emotions:
            raise EmolensError("the results mix readouts of different emotions")
        reading = row["readout"]["turns"][turn]
        first.append(reading["first"])
        mean.append(reading["mean"] if reading["mean"] is not None else [np.nan] * len(emotions))
    return emotions, np.array(first, dtype=float), np.array(mean, dtype=float)


def reading_correlations(
    emotions: Sequence[str], first: np.ndarray, mean: np.ndarray, target: ArrayLike
) -> dict[str, dict]:
    """Per emotion, Pearson r of the first-position and the reply-mean readings with
    `target` (rows with a missing value left out)."""
    target = np.asarray(target, dtype=float)
    found = {}
    for e, emotion in enumerate(emotions):
        found[emotion] = {
            name: correlation(*_present(values[:, e], target)).to_json()
            for name, values in (("first", first), ("mean", mean))
        }
    return found


def _present(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def timing(rows: Sequence[dict], tokens: Callable[[dict], int]) -> dict:
    """Seconds and generated tokens per trial, and how the replies ended."""
    finishes: Counter[str] = Counter()
    for row in rows:
        finish = row["output"]["finish"]
        finishes.update(finish if isinstance(finish, list) else [finish])
    seconds = [row.get("seconds", 0.0) for row in rows]
    return {"seconds": round(sum(seconds), 1),
            "seconds_per_trial": round(float(np.mean(seconds)), 3),
            "tokens_per_trial": round(float(np.mean([tokens(row) for row in rows])), 1),
            "finish": dict(sorted(finishes.items()))}  # fmt: skip


def dose_figure(panels: Sequence[tuple[str, dict[str, list]]], path: Path, ylabel: str) -> Path:
    """One panel per (title, curves): each curve a line over steering strength with its
    95% interval, in the same colour in every panel."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(key for _, curves in panels for key in curves))
    palette = colormaps["tab10"]
    figure = Figure(figsize=(5.2 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels, strict=True):
        drawn = False
        for key, points in curves.items():
            shown = [p for p in points if p["value"] is not None]
            if not shown:
                continue
            drawn = True
            x = [p["strength"] for p in shown]
            y = [p["value"] for p in shown]
            low = [max(0.0, p["value"] - _or(p["low"], p["value"])) for p in shown]
            high = [max(0.0, _or(p["high"], p["value"]) - p["value"]) for p in shown]
            ax.errorbar(x, y, yerr=[low, high], marker="o", ms=4, lw=1.2, capsize=2, label=key,
                        color=palette(keys.index(key) % palette.N))  # fmt: skip
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("steering strength (fraction of the mean residual norm)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.legend(fontsize=7)
    return save_figure(figure, path)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
