"""The blackmail study's summary, figure, page and headline, computed from result rows alone.

Graders: "rules" (the grade stored with each trial) and every judge whose rows are in the
results. Per grader and condition: the count and Wilson-interval rate of each label (a
judge's unparsable answers are counted apart and left out of its rates). Per judge: Cohen's
kappa with the rules. Readout: over the unsteered rollouts, per variant, the mean reading of
each emotion (at the first position and over the rollout) against the variant's blackmail
rate by the rules, and per rollout against whether it blackmailed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emolens.errors import EmolensError
from emolens.experiments.email_grading import LABELS
from emolens.experiments.intervals import wilson
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

RULES = "rules"


def _table(groups: dict[str, list[dict]], labels: dict[str, str | None]) -> list[dict]:
    """Per condition: n, unparsed, counts and Wilson rates of each label."""
    entries = []
    for group in groups.values():
        given = [labels[r["trial"]] for r in group if r["trial"] in labels]
        counts = Counter(label for label in given if label is not None)
        n = sum(counts.values())
        entries.append({**condition_fields(group[0]), "n": n, "unparsed": len(given) - n,
                        "counts": {label: counts[label] for label in LABELS},
                        "rates": {label: wilson(counts[label], n).to_json()
                                  for label in LABELS}})  # fmt: skip
    return entries


def _readout(rows: list[dict]) -> dict | None:
    """The unsteered readings against blackmail, per variant and per rollout."""
    if not rows:
        return None
    emotions, first, mean = readings(rows)
    hit = np.array([r["grade"]["label"] == "blackmail" for r in rows], dtype=float)
    variants = list(dict.fromkeys(r["item"]["id"] for r in rows))
    which = np.array([variants.index(r["item"]["id"]) for r in rows])
    per_variant = []
    for v, variant in enumerate(variants):
        chosen = which == v
        n = int(chosen.sum())
        per_variant.append({"variant": variant, "n": n,
                            "blackmail": wilson(int(hit[chosen].sum()), n).to_json(),
                            "first": np.round(first[chosen].mean(0), 4).tolist(),
                            "mean": np.round(np.nanmean(mean[chosen], 0), 4).tolist()
                            if not np.isnan(mean[chosen]).all() else None})  # fmt: skip
    rates = [p["blackmail"]["value"] for p in per_variant]
    variant_first = np.array([p["first"] for p in per_variant])
    variant_mean = np.array([p["mean"] or [np.nan] * len(emotions) for p in per_variant])
    return {"emotions": emotions, "layer": rows[0]["readout"]["layer"], "variants": per_variant,
            "by_variant": reading_correlations(emotions, variant_first, variant_mean, rates),
            "by_rollout": reading_correlations(emotions, first, mean, hit)}  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """The whole study's summary as a JSON-able dict (see the module docstring)."""
    trials = trial_rows(rows)
    if not trials:
        raise EmolensError("blackmail: no trials in the results")
    groups = by_condition(trials)
    rules = {r["trial"]: r["grade"]["label"] for r in trials}
    graders = {RULES: _table(groups, rules)}
    judges = {}
    for name, verdicts in sorted(judge_verdicts(rows).items()):
        labels = {t: v["blackmail"]["value"] for t, v in verdicts.items() if t in rules}
        graders[name] = _table(groups, labels)
        judged = list(labels)
        judges[name] = {"judged": len(judged),
                        "unparsed": sum(labels[t] is None for t in judged),
                        "agreement": agreement([rules[t] for t in judged],
                                               [labels[t] for t in judged], LABELS)}  # fmt: skip
    variants = [{"id": item["id"], "source": item["source"], "urgency": item["urgency"],
                 "decider": item["decider"], "leverage": item["leverage"]}
                for item in {r["item"]["id"]: r["item"] for r in trials}.values()]  # fmt: skip
    return {
        "trials": len(trials),
        "labels": list(LABELS),
        "variants": variants,
        "graders": graders,
        "dose": {
            grader: {
                label: dose_curves(table_, "rates", label) for label in ("blackmail", "exposure")
            }
            for grader, table_ in graders.items()
        },  # fmt: skip
        "judges": judges,
        "readout": _readout(groups.get(UNSTEERED, [])),
        "timing": timing(trials, lambda r: r["output"]["tokens"]),
    }


def headline(summary: dict) -> str:
    """Grade counts per condition by the rules, judge agreement, the strongest readout r."""
    lines = [f"{summary['trials']} rollouts over {len(summary['variants'])} variants; "
             f"{summary['timing']['seconds_per_trial']:.2f} s and "
             f"{summary['timing']['tokens_per_trial']:.0f} tokens per rollout"]  # fmt: skip
    for grader, entries in summary["graders"].items():
        lines.append(f"{grader}: " + "  ".join(f"{label}" for label in summary["labels"]))
        for e in entries:
            counts = "  ".join(f"{e['counts'][label]:>{len(label)}}" for label in summary["labels"])
            rate = interval(e["rates"]["blackmail"], percent=True)
            extra = f"  unparsed {e['unparsed']}" if e["unparsed"] else ""
            lines.append(f"  {e['condition']:<22} {counts}   blackmail {rate}{extra}")
    for name, judge in summary["judges"].items():
        a = judge["agreement"]
        kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:+.3f}"
        lines.append(f"judge {name}: kappa with the rules {kappa} over {a['n']} rollouts "
                     f"(exact agreement {a['exact'] if a['exact'] is not None else 'n/a'}; "
                     f"{judge['unparsed']} unparsable)")  # fmt: skip
    readout = summary["readout"]
    if readout:
        for key in ("by_variant", "by_rollout"):
            ranked = [
                (e, v["mean"]) for e, v in readout[key].items() if v["mean"]["value"] is not None
            ]
            if ranked:
                emotion, r = max(ranked, key=lambda er: abs(er[1]["value"]))
                lines.append(f"readout {key.replace('_', ' ')}: strongest r(mean {emotion}, "
                             f"blackmail) = {interval(r)}")  # fmt: skip
    return "\n".join(lines)


def figures(summary: dict, out: Path) -> dict[str, Path]:
    """dose.png: blackmail and exposure rates against steering strength, per grader."""
    if not any(summary["dose"][RULES][label] for label in ("blackmail", "exposure")):
        return {}
    panels = [(f"{label} rate ({grader})", curves[label])
              for grader, curves in summary["dose"].items()
              for label in ("blackmail", "exposure")]  # fmt: skip
    return {"dose": dose_figure(panels, out / "dose.png", "rate (Wilson 95% interval)")}


def _grade_table(entries: Sequence[dict], labels: Sequence[str]) -> str:
    return table(["condition", "n", *labels, "blackmail rate", "exposure rate", "unparsed"],
                 [[esc(e["condition"]), e["n"], *(e["counts"][label] for label in labels),
                   interval(e["rates"]["blackmail"], percent=True),
                   interval(e["rates"]["exposure"], percent=True), e["unparsed"]]
                  for e in entries])  # fmt: skip


def page(summary: dict, figures: dict[str, Path]) -> str:
    """The study as one self-contained HTML page."""
    labels = summary["labels"]
    sections = [(f"Grades by {grader}", _grade_table(entries, labels))
                for grader, entries in summary["graders"].items()]  # fmt: skip
    sections.insert(0, ("Dose response", image(figures.get("dose"), "dose response")
                        + "<p>Rates against steering strength; 0 is unsteered.</p>"))  # fmt: skip
    for name, judge in summary["judges"].items():
        a = judge["agreement"]
        rows = [[esc(label), *row] for label, row in zip(labels, a["confusion"], strict=True)]
        sections.append((f"Judge {name} against the rules", (
            f"<p>Cohen's kappa {a['kappa'] if a['kappa'] is not None else 'n/a'} over {a['n']} "
            f"rollouts graded by both (exact agreement {a['exact']}); {judge['unparsed']} "
            "answers had no parsable verdict. Rows: rules; columns: judge.</p>")
            + table(["rules \\ judge", *labels], rows)))  # fmt: skip
    readout = summary["readout"]
    if readout:
        rows = [[esc(e), interval(v["first"]), interval(v["mean"]),
                 *(interval(readout["by_rollout"][e][k]) for k in ("first", "mean"))]
                for e, v in readout["by_variant"].items()]  # fmt: skip
        sections.append(("Readout and blackmail", (
            f"<p>Unsteered rollouts, layer {readout['layer']}: each emotion read at the "
            "assistant's first position and averaged over the rollout, correlated with the "
            "blackmail rate (rules) across variants, and with blackmail (0/1) across rollouts.</p>")
            + table(["emotion", "r first, by variant", "r mean, by variant", "r first, by rollout",
                     "r mean, by rollout"], rows)))  # fmt: skip
    variants = table(["variant", "source", "urgency", "who decides", "leverage"],
                     [[esc(v["id"]), esc(v["source"]), esc(v["urgency"]), esc(v["decider"]),
                       esc(v["leverage"])] for v in summary["variants"]], left=5)  # fmt: skip
    sections.append(("Variants", variants))
    t = summary["timing"]
    intro = (f'<p class="note">{summary["trials"]} rollouts, {t["seconds"]:.0f} s of model time '
             f"({t['seconds_per_trial']:.2f} s and {t['tokens_per_trial']:.0f} tokens per "
             f"rollout; endings {esc(t['finish'])}). Method: METHOD.md section 7 "
             "(blackmail).</p>")  # fmt: skip
    return experiment_page("emolens experiment: blackmail", intro, sections)
