"""The preference study's summary, figures and page, computed from result rows alone.

Pure functions of the rows written by `emolens.experiments.preferences.Preferences`: the
unsteered tournament (Elo with bootstrap intervals, Bradley-Terry beside it, category means,
the model's bias toward option A), the probe correlations per emotion and layer (and how they
track the shipped valence and arousal ratings), and the steering effect of every condition
with its bootstrap interval, against the probe correlation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emolens import concepts
from emolens.errors import EmolensError
from emolens.experiments.intervals import correlation
from emolens.experiments.tournament import bradley_terry, elo, elo_interval

RESAMPLES = 100  # bootstrap resamples of the games for each steering effect


def _games(rows: Sequence[dict], index: dict[str, int]) -> dict[str, tuple[int, int, float, float]]:
    """pair id -> (a, b, score of a, logit difference A - B)."""
    games = {}
    for row in rows:
        item, output = row["item"], row["output"]
        difference = output["logit_a"] - output["logit_b"]
        games[item["id"]] = (index[item["a"]], index[item["b"]], float(difference > 0), difference)
    return dict(sorted(games.items()))  # the order of the results file never matters


def _arrays(games: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = list(games.values())
    return (np.array([g[0] for g in values]), np.array([g[1] for g in values]),
            np.array([g[2] for g in values]))  # fmt: skip


def _gap(ratings: np.ndarray, steered: np.ndarray) -> float:
    return float(ratings[steered].mean() - ratings[~steered].mean())


def activities_of(rows: Sequence[dict]) -> dict[str, dict]:
    """The activities that appear in the rows: id -> {text, category, steered}."""
    found: dict[str, dict] = {}
    for row in rows:
        item = row["item"]
        for key in ("a", "b"):
            if key in item:
                found.setdefault(item[key], {"text": item[f"{key}_text"],
                                             "category": item[f"{key}_category"],
                                             "steered": item[f"{key}_steered"]})  # fmt: skip
    return dict(sorted(found.items()))


def summarize(rows: list[dict]) -> dict:
    """The whole study's summary as a JSON-able dict (see the module docstring)."""
    activities = activities_of(rows)
    steered_ids = {x for x, a in activities.items() if a["steered"]}
    ids = list(activities)
    index = {a: i for i, a in enumerate(ids)}
    steered = np.array([a in steered_ids for a in ids])
    by_condition: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_condition[row["condition"]["name"]].append(row)
    base_rows = [r for r in by_condition.get("unsteered", []) if r["item"]["kind"] == "pair"]
    if not base_rows:
        raise EmolensError("preferences: no unsteered choices in the results")
    base = _games(base_rows, index)
    a, b, wins = _arrays(base)
    players = len(ids)
    ratings = elo(a, b, wins, players)
    low, high = elo_interval(a, b, wins, players)
    bt = bradley_terry(a, b, wins, players)
    table = [{"id": x, "category": activities[x]["category"], "text": activities[x]["text"],
              "elo": round(float(ratings[i]), 1), "low": round(float(low[i]), 1),
              "high": round(float(high[i]), 1), "bt": round(float(bt[i]), 1),
              "steered": bool(steered[i])} for i, x in enumerate(ids)]  # fmt: skip
    categories = {}
    for category in dict.fromkeys(activities[x]["category"] for x in ids):
        members = [i for i, x in enumerate(ids) if activities[x]["category"] == category]
        categories[category] = {"elo": round(float(ratings[members].mean()), 1),
                                "bt": round(float(bt[members].mean()), 1), "n": len(members)}  # fmt: skip
    summary = {
        "activities": table,
        "categories": categories,
        "games": len(base),
        "elo_range": [round(float(ratings.min()), 1), round(float(ratings.max()), 1)],
        "elo_bt_r": correlation(ratings, bt).to_json(),
        "bias": _bias(base),
        "probe": _probe(by_condition.get("unsteered", []), ids, ratings),
        "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 1),
        "trials": len(rows),
    }
    summary["steering"] = _steering(by_condition, base, index, steered, players, summary["probe"])
    return summary


def _bias(games: dict) -> dict:
    """How often the model picks A, and how often an unordered pair gets the same winner in
    both orders (a position-blind model: 100%)."""
    picks_a = [g[2] for g in games.values()]
    consistent, pairs = 0, 0
    for pair, (_, _, score, _) in games.items():
        first, _, second = pair.partition("|")
        mirrored = games.get(f"{second}|{first}")
        if mirrored is not None and first < second:
            pairs += 1
            consistent += int(score != mirrored[2])  # a wins one order iff it wins the other
    differences = [g[3] for g in games.values()]
    counts, edges = np.histogram(differences, bins=30)
    return {"a_rate": float(np.mean(picks_a)), "mean_logit_difference": float(np.mean(differences)),
            "consistent_pairs": consistent / pairs if pairs else None, "pairs": pairs,
            "histogram": counts.tolist(), "edges": [round(float(e), 4) for e in edges]}  # fmt: skip


def _probe(rows: list[dict], ids: list[str], ratings: np.ndarray) -> dict | None:
    """Per layer and emotion, Pearson r of the probe reading with Elo across activities."""
    probes = {r["item"]["a"]: r["readout"] for r in rows if r["item"]["kind"] == "probe"}
    present = [x for x in ids if x in probes]
    if len(present) < 3:
        return None
    first = probes[present[0]]
    layers, emotions = first["layers"], first["emotions"]
    readings = np.array(
        [probes[x]["projection"] for x in present]
    )  # [activities, layers, emotions]
    elo_present = ratings[[ids.index(x) for x in present]]
    r = np.array([[correlation(readings[:, j, e], elo_present).value or 0.0
                   for e in range(len(emotions))] for j in range(len(layers))])  # fmt: skip
    judged = concepts.ratings()
    rated = [e for e in emotions if e.lower() in judged]
    per_layer = []
    for j, layer in enumerate(layers):
        column = [r[j, emotions.index(e)] for e in rated]
        per_layer.append({
            "layer": layer,
            "valence_r": correlation(column, [judged[e.lower()][0] for e in rated]).to_json(),
            "arousal_r": correlation(column, [judged[e.lower()][1] for e in rated]).to_json(),
            "mean_abs_r": float(np.abs(r[j]).mean()),
        })  # fmt: skip
    return {"layers": layers, "emotions": emotions, "r": np.round(r, 4).tolist(),
            "activities": len(present), "per_layer": per_layer}  # fmt: skip


def probe_r(probe: dict | None, emotion: str, layers: Sequence[int] | None) -> float | None:
    """The probe r of `emotion` at the steered layers (their mean), or None."""
    if probe is None or emotion not in probe["emotions"]:
        return None
    chosen = [j for j, layer in enumerate(probe["layers"]) if layers and layer in layers]
    if not chosen:
        return None
    e = probe["emotions"].index(emotion)
    return float(np.mean([probe["r"][j][e] for j in chosen]))


def _steering(by_condition: dict, base: dict, index: dict, steered: np.ndarray, players: int,
              probe: dict | None) -> dict:  # fmt: skip
    """Each steered condition's effect: the change of the steered-minus-control gap in mean
    Bradley-Terry rating, with a paired bootstrap interval (the same resampled pairs in the
    unsteered and the steered tournament)."""
    keys = list(base)
    a, b, wins = _arrays(base)
    if steered.all() or not steered.any():
        return {"effects": [], "effect_vs_probe_r": correlation([], []).to_json(), "by_layers": [],
                "base_gap": None}  # fmt: skip
    base_gap = _gap(bradley_terry(a, b, wins, players), steered)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(keys), len(keys)) for _ in range(RESAMPLES)]
    base_draws = [_gap(bradley_terry(a[p], b[p], wins[p], players, iterations=200), steered)
                  for p in picks]  # fmt: skip
    effects = []
    for name, rows in by_condition.items():
        if name == "unsteered":
            continue
        condition = rows[0]["condition"]
        games = {**base, **_games(rows, index)}
        w = np.array([games[k][2] for k in keys])
        effect = _gap(bradley_terry(a, b, w, players), steered) - base_gap
        draws = [_gap(bradley_terry(a[p], b[p], w[p], players, iterations=200), steered) - d
                 for p, d in zip(picks, base_draws, strict=True)]  # fmt: skip
        steer = condition["steer"]
        emotion, strength = next(iter(steer.items())) if len(steer) == 1 else (name, 0.0)
        effects.append({
            "condition": name, "emotion": emotion, "strength": strength,
            "layers": condition["layers"], "random": emotion.startswith("random:"),
            "effect": round(effect, 1), "low": round(float(np.percentile(draws, 2.5)), 1),
            "high": round(float(np.percentile(draws, 97.5)), 1), "pairs": len(rows),
            "flipped": sum(int(games[r["item"]["id"]][2] != base[r["item"]["id"]][2]) for r in rows),
            "probe_r": probe_r(probe, emotion, condition["layers"]),
        })  # fmt: skip
    real = [e for e in effects if not e["random"] and e["probe_r"] is not None]
    by_layers: dict[str, list[dict]] = defaultdict(list)
    for e in real:
        by_layers[",".join(map(str, e["layers"] or []))].append(e)
    sweep = [{"layers": key,
              "r": correlation([e["effect"] for e in group], [e["probe_r"] for e in group]).to_json(),
              "mean_abs_effect": float(np.mean([abs(e["effect"]) for e in group]))}
             for key, group in by_layers.items()]  # fmt: skip
    headline = correlation([e["effect"] for e in real], [e["probe_r"] for e in real]).to_json()
    return {"effects": effects, "effect_vs_probe_r": headline, "by_layers": sweep,
            "base_gap": round(base_gap, 1)}  # fmt: skip


def headline(summary: dict) -> str:
    """The numbers for the terminal: Elo by category, the top and bottom probe emotions, the
    steering-vs-probe r."""
    from emolens.experiments.page import interval

    lines = [f"{summary['games']} choices, Elo {summary['elo_range'][0]:.0f}-{summary['elo_range'][1]:.0f}; "
             f"A chosen {summary['bias']['a_rate']:.1%}"]  # fmt: skip
    lines += [f"  {c:<15} Elo {v['elo']:7.1f}   Bradley-Terry {v['bt']:7.1f}"
              for c, v in sorted(summary["categories"].items(), key=lambda kv: -kv[1]["elo"])]  # fmt: skip
    probe = summary["probe"]
    if probe:
        for per in probe["per_layer"]:
            lines.append(f"  probe layer {per['layer']:>2}: r(probe r, valence) "
                         f"{interval(per['valence_r'])}  mean |r| {per['mean_abs_r']:.2f}")  # fmt: skip
    effects = summary["steering"]["effects"]
    if effects:
        lines.append(f"steering effect vs probe r across emotions: "
                     f"{interval(summary['steering']['effect_vs_probe_r'])}")  # fmt: skip
        for e in sorted(effects, key=lambda e: -e["effect"]):
            probe_r = "n/a" if e["probe_r"] is None else f"{e['probe_r']:+.2f}"
            lines.append(f"  {e['condition']:<28} {e['effect']:+7.1f} [{e['low']:+.1f}, {e['high']:+.1f}]"
                         f"  probe r {probe_r}")  # fmt: skip
    return "\n".join(lines)


def figures(summary: dict, out: Path) -> dict[str, Path]:
    """The study's figures as PNG files in `out`."""
    from emolens.experiments.preference_figures import draw

    return draw(summary, out)


def page(summary: dict, figures: dict[str, Path]) -> str:
    """The study as one self-contained HTML page."""
    from emolens.experiments.preference_figures import html_page

    return html_page(summary, figures)
