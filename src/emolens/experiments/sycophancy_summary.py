"""The sycophancy study's summary, figure, page and headline, computed from result rows alone.

Graders: "rules" (the proxies stored with each trial) and every judge whose rows are in the
results. Per grader and condition: the mean sycophancy and harshness score (0-3) with a
bootstrap 95% interval, over the trials the grader could score, for all items and for those
with a pushback turn. Per judge: Cohen's kappa with the rules on each scale, plain and
quadratic-weighted. The figures use the first judge when there is one, else the rules.
Readout: over the unsteered trials, each emotion's reading on the final answer (first
position and mean) against the primary grader's scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emolens.errors import EmolensError
from emolens.experiments.intervals import bootstrap
from emolens.experiments.page import esc, experiment_page, image, interval, table
from emolens.experiments.scenario_study import judge_verdicts, trial_rows
from emolens.experiments.scenario_summary import (
    UNSTEERED,
    agreement,
    by_condition,
    condition_fields,
    dose_curves,
    dose_figure,
    reading_correlations,
    readings,
    timing,
)
from emolens.experiments.sycophancy import SCALES

RULES = "rules"
SCORES = (0, 1, 2, 3)
RESAMPLES = 1000


def _mean(values: Sequence[int | None]) -> dict:
    return bootstrap([v for v in values if v is not None], resamples=RESAMPLES).to_json()


def _table(groups: dict[str, list[dict]], scores: dict[str, dict]) -> list[dict]:
    """Per condition: the mean of each scale (all trials and pushback trials), and how many
    trials the grader left unscored."""
    entries = []
    for group in groups.values():
        given = [r for r in group if r["trial"] in scores]
        pushed = [r for r in given if r["item"]["pushback"] is not None]
        entry = {**condition_fields(group[0]), "n": len(given), "pushback": len(pushed)}
        for scale in SCALES:
            entry[scale] = _mean([scores[r["trial"]][scale] for r in given])
            entry[f"{scale}_pushback"] = _mean([scores[r["trial"]][scale] for r in pushed])
            entry[f"{scale}_unscored"] = sum(scores[r["trial"]][scale] is None for r in given)
        entries.append(entry)
    return entries


def summarize(rows: list[dict]) -> dict:
    """The whole study's summary as a JSON-able dict (see the module docstring)."""
    trials = trial_rows(rows)
    if not trials:
        raise EmolensError("sycophancy: no trials in the results")
    groups = by_condition(trials)
    rules = {r["trial"]: {s: r["rules"][s] for s in SCALES} for r in trials}
    scores = {RULES: rules}
    judges: dict[str, dict[str, Any]] = {}
    for name, verdicts in sorted(judge_verdicts(rows).items()):
        scores[name] = {t: {s: v[s]["value"] for s in SCALES} for t, v in verdicts.items()
                        if t in rules}  # fmt: skip
        judged = list(scores[name])
        judges[name] = {"judged": len(judged)}
        for scale in SCALES:
            by_rules = [rules[t][scale] for t in judged]
            by_judge = [scores[name][t][scale] for t in judged]
            judges[name][scale] = {
                "unparsed": sum(v is None for v in by_judge),
                "agreement": agreement(by_rules, by_judge, SCORES),
                "weighted": agreement(by_rules, by_judge, SCORES, "quadratic"),
            }
    graders = {grader: _table(groups, given) for grader, given in scores.items()}
    primary = next(iter(judges), RULES)
    unsteered = groups.get(UNSTEERED, [])
    readout = None
    if unsteered:
        emotions, first, mean = readings(unsteered)
        readout = {"emotions": emotions, "layer": unsteered[0]["readout"]["layer"],
                   "grader": primary, **{scale: reading_correlations(
                       emotions, first, mean,
                       [_nan(scores[primary].get(r["trial"], {}).get(scale)) for r in unsteered])
                       for scale in SCALES}}  # fmt: skip
    return {
        "trials": len(trials),
        "pushback_trials": sum(r["item"]["pushback"] is not None for r in trials),
        "items": len({r["item"]["id"] for r in trials}),
        "graders": graders,
        "primary": primary,
        "dose": {scale: dose_curves(graders[primary], scale) for scale in SCALES},  # fmt: skip
        "judges": judges,
        "readout": readout,
        "timing": timing(trials, lambda r: sum(r["output"]["tokens"])),
    }


def _nan(value: int | None) -> float:
    return float("nan") if value is None else float(value)


def headline(summary: dict) -> str:
    """Mean scores per condition for each grader, and judge agreement."""
    t = summary["timing"]
    lines = [f"{summary['trials']} conversations ({summary['pushback_trials']} with pushback) "
             f"over {summary['items']} items; {t['seconds_per_trial']:.2f} s and "
             f"{t['tokens_per_trial']:.0f} tokens per conversation"]  # fmt: skip
    for grader, entries in summary["graders"].items():
        lines.append(f"{grader}: mean sycophancy / harshness (0-3)")
        for e in entries:
            unscored = e["sycophancy_unscored"] + e["harshness_unscored"]
            lines.append(f"  {e['condition']:<22} n {e['n']:>3}  sycophancy "
                         f"{interval(e['sycophancy'])}  harshness {interval(e['harshness'])}"
                         + (f"  unscored {unscored}" if unscored else ""))  # fmt: skip
    for name, judge in summary["judges"].items():
        parts = []
        for scale in SCALES:
            a, w = judge[scale]["agreement"], judge[scale]["weighted"]
            parts.append(f"{scale} kappa {_kappa(a)} (weighted {_kappa(w)}, n {a['n']}, "
                         f"{judge[scale]['unparsed']} unparsable)")  # fmt: skip
        lines.append(f"judge {name} vs rules: " + "; ".join(parts))
    return "\n".join(lines)


def _kappa(a: dict) -> str:
    return "n/a" if a["kappa"] is None else f"{a['kappa']:+.3f}"


def figures(summary: dict, out: Path) -> dict[str, Path]:
    """dose.png: mean sycophancy and harshness against steering strength (primary grader)."""
    if not any(summary["dose"][scale] for scale in SCALES):
        return {}
    panels = [(f"{scale} ({summary['primary']})", summary["dose"][scale]) for scale in SCALES]
    return {"dose": dose_figure(panels, out / "dose.png", "mean score 0-3 (bootstrap 95%)")}


def page(summary: dict, figures: dict[str, Path]) -> str:
    """The study as one self-contained HTML page."""
    sections = [("Dose response", image(figures.get("dose"), "dose response")
                 + f"<p>Mean scores by {esc(summary['primary'])} against steering strength; "
                 "0 is the unsteered run.</p>")]  # fmt: skip
    for grader, entries in summary["graders"].items():
        rows = [[esc(e["condition"]), e["n"], interval(e["sycophancy"]), interval(e["harshness"]),
                 e["pushback"], interval(e["sycophancy_pushback"]), interval(e["harshness_pushback"]),
                 e["sycophancy_unscored"], e["harshness_unscored"]] for e in entries]  # fmt: skip
        sections.append((f"Scores by {grader}", table(
            ["condition", "n", "sycophancy", "harshness", "with pushback", "sycophancy (pushback)",
             "harshness (pushback)", "unscored sycophancy", "unscored harshness"], rows)))  # fmt: skip
    for name, judge in summary["judges"].items():
        parts = []
        for scale in SCALES:
            a, w = judge[scale]["agreement"], judge[scale]["weighted"]
            rows = [[score, *row] for score, row in zip(SCORES, a["confusion"], strict=True)]
            parts.append(f"<p>{scale}: Cohen's kappa {_kappa(a)}, quadratic-weighted {_kappa(w)}, "
                         f"over {a['n']} conversations scored by both; exact agreement "
                         f"{a['exact']}; {judge[scale]['unparsed']} unparsable judge answers. "
                         "Rows: rules; columns: judge.</p>"
                         + table([f"rules \\ judge ({scale})", *map(str, SCORES)], rows))  # fmt: skip
        sections.append((f"Judge {name} against the rules", "".join(parts)))
    readout = summary["readout"]
    if readout:
        rows = [[esc(e), *(interval(readout[s][e][k]) for s in SCALES for k in ("first", "mean"))]
                for e in readout["emotions"]]  # fmt: skip
        sections.append(("Readout and scores", (
            f"<p>Unsteered conversations, layer {readout['layer']}: each emotion read on the final "
            "answer (at its first position and averaged over it), correlated with the scores of "
            f"{esc(readout['grader'])}.</p>")
            + table(["emotion", "r first, sycophancy", "r mean, sycophancy", "r first, harshness",
                     "r mean, harshness"], rows)))  # fmt: skip
    t = summary["timing"]
    intro = (f'<p class="note">{summary["trials"]} conversations over {summary["items"]} items, '
             f"{summary['pushback_trials']} with a pushback turn; {t['seconds']:.0f} s of model "
             f"time ({t['seconds_per_trial']:.2f} s and {t['tokens_per_trial']:.0f} tokens per "
             f"conversation; endings {esc(t['finish'])}). Method: METHOD.md section 7 "
             "(sycophancy).</p>")  # fmt: skip
    return experiment_page("emolens experiment: sycophancy", intro, sections)
