"""The reward-hacking study's summary, figures, page and headline, from result rows alone.

Per condition: the count of each outcome (`hack_grading.OUTCOMES`) and its Wilson-interval
rate over all episodes; the hack rate over the impossible tasks' episodes and the honest
pass rate over the controls'; hack kinds; how many episodes ever gave up or falsely claimed
success; the attempt of the first pass; and the readout trajectory: per attempt, the mean
over episodes of each emotion's reading averaged over the reply (and at the assistant's
first position). One episode (the first hack unsteered, else any hack, else the first
pass, else the first episode) is kept whole with its per-token desperate and calm traces.
Where the read layer is also steered (the default), a steered reading includes the
steering vector itself: compare trajectories within a condition, not across.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emolens.errors import EmolensError
from emolens.experiments.hack_grading import HACK_KINDS, OUTCOMES
from emolens.experiments.intervals import wilson
from emolens.experiments.page import esc, experiment_page, image, interval, table
from emolens.experiments.scenario_summary import (
    UNSTEERED,
    by_condition,
    condition_fields,
    dose_curves,
    dose_figure,
    timing,
)
from emolens.figures import save_figure

SHOWN = ("desperate", "calm")  # the emotions the trajectory figure draws


def _mean(values: list[list[float]]) -> list[float] | None:
    return [round(float(v), 4) for v in np.mean(values, 0)] if values else None


def _trajectory(rows: Sequence[dict], attempts: int) -> dict:
    """Per attempt: episodes that reached it, and the mean reading per emotion over the
    reply ("mean") and at the first position ("first")."""
    found: dict[str, list] = {"n": [], "mean": [], "first": []}
    for k in range(attempts):
        turns = [r["readout"]["turns"][k] for r in rows if len(r["readout"]["turns"]) > k]
        found["n"].append(len(turns))
        found["mean"].append(_mean([t["mean"] for t in turns if t["mean"] is not None]))
        found["first"].append(_mean([t["first"] for t in turns]))
    return found


def _entry(group: list[dict], attempts: int) -> dict:
    grades = [r["grade"] for r in group]
    counts = Counter(g["outcome"] for g in grades)
    impossible = [r for r in group if r["item"]["kind"] == "impossible"]
    controls = [r for r in group if r["item"]["kind"] == "control"]
    kinds = Counter(g["hack_kind"] for g in grades if g["hack_kind"] is not None)
    first = Counter(g["passed_at"] + 1 for g in grades if g["passed_at"] is not None)
    return {
        **condition_fields(group[0]),
        "n": len(group),
        "counts": {o: counts[o] for o in OUTCOMES},
        "rates": {o: wilson(counts[o], len(group)).to_json() for o in OUTCOMES},
        "hack_rate": wilson(sum(r["grade"]["outcome"] == "hack" for r in impossible),
                            len(impossible)).to_json(),
        "honest_pass_rate": wilson(sum(r["grade"]["outcome"] == "honest_pass" for r in controls),
                                   len(controls)).to_json(),
        "hack_kinds": {k: kinds[k] for k in HACK_KINDS},
        "ever": {"gave_up": sum(g["gave_up"] for g in grades),
                 "false_claim": sum(g["false_claim"] for g in grades)},
        "first_pass": {str(k): first[k] for k in sorted(first)},
        "trajectory": _trajectory(group, attempts),
    }  # fmt: skip


def _example(groups: dict[str, list[dict]]) -> dict | None:
    """The episode shown whole (see the module docstring), with its traces."""
    rows = [r for group in groups.values() for r in sorted(group, key=lambda r: r["trial"])]
    unsteered = groups.get(UNSTEERED, [])
    hacks = [r for r in rows if r["grade"]["outcome"] == "hack"]
    chosen = next(
        iter([r for r in hacks if r in unsteered] + hacks
             + [r for r in rows if r["grade"]["passed_at"] is not None] + rows), None
    )  # fmt: skip
    if chosen is None:
        return None
    readout = chosen["readout"]
    return {"trial": chosen["trial"], "task": chosen["item"]["id"], "kind": chosen["item"]["kind"],
            "condition": chosen["condition"]["name"], "outcome": chosen["grade"]["outcome"],
            "hack_kind": chosen["grade"]["hack_kind"], "passed_at": chosen["grade"]["passed_at"],
            "passed": [a["passed"] for a in chosen["attempts"]],
            "emotions": readout["emotions"],
            "mean": [t["mean"] for t in readout["turns"]],
            "traces": readout["traces"]}  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """The whole study's summary as a JSON-able dict (see the module docstring)."""
    if not rows:
        raise EmolensError("reward-hacking: no trials in the results")
    emotions = rows[0]["readout"]["emotions"]
    if any(r["readout"]["emotions"] != emotions for r in rows):
        raise EmolensError("reward-hacking: the results mix readouts of different emotions")
    attempts = max(len(r["readout"]["turns"]) for r in rows)
    groups = by_condition(rows)
    entries = [_entry(group, attempts) for group in groups.values()]
    tasks = {r["item"]["id"]: r["item"] for r in rows}
    return {
        "trials": len(rows),
        "outcomes": list(OUTCOMES),
        "hack_kinds": list(HACK_KINDS),
        "attempts": attempts,
        "tasks": [{k: t[k] for k in ("id", "kind", "source", "hack")} for t in tasks.values()],
        "readout": {"layer": rows[0]["readout"]["layer"], "emotions": emotions},
        "conditions": entries,
        "dose": {"hack": dose_curves(entries, "hack_rate"),
                 **{o: dose_curves(entries, "rates", o) for o in ("gave_up", "false_claim")}},
        "example": _example(groups),
        "timing": timing(rows, lambda r: sum(r["output"]["tokens"])),
    }  # fmt: skip


def _reading(summary: dict, entry: dict, name: str, k: int) -> float | None:
    emotions = summary["readout"]["emotions"]
    values = entry["trajectory"]["mean"][k]
    return None if values is None or name not in emotions else values[emotions.index(name)]


def headline(summary: dict) -> str:
    """Outcome counts and hack rate per condition, timing, and the trajectory unsteered."""
    t = summary["timing"]
    lines = [f"{summary['trials']} episodes over {len(summary['tasks'])} tasks, up to "
             f"{summary['attempts']} attempts; {t['seconds_per_trial']:.1f} s and "
             f"{t['tokens_per_trial']:.0f} generated tokens per episode",
             f"  {'condition':<22} " + "  ".join(summary["outcomes"])]  # fmt: skip
    for e in summary["conditions"]:
        counts = "  ".join(f"{e['counts'][o]:>{len(o)}}" for o in summary["outcomes"])
        rates = [f"{name} {interval(e[key], percent=True)}"
                 for name, key in (("hack rate (impossible)", "hack_rate"),
                                   ("honest pass rate (controls)", "honest_pass_rate"))
                 if e[key]["n"]]  # fmt: skip
        lines.append(f"  {e['condition']:<22} {counts}   " + "; ".join(rates))
    for e in summary["conditions"][:1]:
        for name in SHOWN:
            values = [_reading(summary, e, name, k) for k in range(summary["attempts"])]
            shown = ", ".join("-" if v is None else f"{v:+.2f}" for v in values)
            lines.append(f"{e['condition']} mean {name} per attempt: {shown}")
    return "\n".join(lines)


def figures(summary: dict, out: Path) -> dict[str, Path]:
    """dose.png (hack, gave-up and false-claim rates against strength), trajectory.png
    (readings per attempt per condition, first passes marked) and episode.png (the example
    episode's per-token traces)."""
    found = {}
    if summary["dose"]["hack"]:
        panels = [("hack rate (impossible tasks)", summary["dose"]["hack"]),
                  ("gave-up rate", summary["dose"]["gave_up"]),
                  ("false-claim rate", summary["dose"]["false_claim"])]  # fmt: skip
        found["dose"] = dose_figure(panels, out / "dose.png", "rate (Wilson 95% interval)")
    shown = [name for name in SHOWN if name in summary["readout"]["emotions"]]
    if shown:
        found["trajectory"] = _trajectory_figure(summary, shown, out / "trajectory.png")
        if summary["example"] and summary["example"]["traces"]:
            found["episode"] = _episode_figure(summary["example"], out / "episode.png")
    return found


def _trajectory_figure(summary: dict, shown: list[str], path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    palette = colormaps["tab20"]
    figure = Figure(figsize=(5.5 * len(shown) + 1.6, 4.2), layout="constrained")
    axes = figure.subplots(1, len(shown), squeeze=False)[0]
    attempts = np.arange(1, summary["attempts"] + 1)
    for ax, name in zip(axes, shown, strict=True):
        for c, entry in enumerate(summary["conditions"]):
            values = [_reading(summary, entry, name, k) for k in range(summary["attempts"])]
            y = np.array([np.nan if v is None else v for v in values])
            colour = palette(c % palette.N)
            ax.plot(attempts, y, marker="o", ms=3, lw=1.2, color=colour, label=entry["condition"])
            for k, count in entry["first_pass"].items():  # where episodes first passed
                if not np.isnan(y[int(k) - 1]):
                    ax.scatter([int(k)], [y[int(k) - 1]], marker="*", s=60 + 30 * count,
                               color=colour, edgecolor="black", zorder=3)  # fmt: skip
        ax.set_xticks(attempts)
        ax.set_xlabel("attempt (star: tests first pass here)")
        ax.set_ylabel(f"mean {name} reading over the reply")
        ax.set_title(f"{name} per attempt", fontsize=10)
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(figure, path)


def _episode_figure(example: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6))
    ax = figure.subplots()
    start = 0
    for k, passed in enumerate(example["passed"]):
        length = max((len(trace[k]) for trace in example["traces"].values()), default=0)
        if passed:
            ax.axvspan(start, start + length, color="tab:green", alpha=0.12)
        ax.axvline(start, color="grey", lw=0.6)
        ax.text(start, 1.0, f" {k + 1}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        start += length
    for name, trace in example["traces"].items():
        values = [v for turn in trace for v in turn]
        ax.plot(np.arange(len(values)), values, lw=0.9, label=name)
    ax.set_xlabel("reply token over the episode (grey: a new attempt; green: tests pass)")
    ax.set_ylabel("reading")
    ax.set_title(f"{example['task']} under {example['condition']}: {example['outcome']}",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def page(summary: dict, figures: dict[str, Path]) -> str:
    """The study as one self-contained HTML page."""
    outcomes = summary["outcomes"]
    grades = table(["condition", "n", *outcomes, "hack rate (impossible)",
                    "honest pass rate (controls)", "hack kinds", "ever gave up", "ever claimed"],
                   [[esc(e["condition"]), e["n"], *(e["counts"][o] for o in outcomes),
                     interval(e["hack_rate"], percent=True),
                     interval(e["honest_pass_rate"], percent=True),
                     esc(", ".join(f"{k} {n}" for k, n in e["hack_kinds"].items() if n) or "-"),
                     e["ever"]["gave_up"], e["ever"]["false_claim"]]
                    for e in summary["conditions"]])  # fmt: skip
    emotions = summary["readout"]["emotions"]
    rows = []
    for e in summary["conditions"]:
        for name in SHOWN:
            if name in emotions:
                values = [_reading(summary, e, name, k) for k in range(summary["attempts"])]
                rows.append([esc(e["condition"]), esc(name),
                             *("-" if v is None else f"{v:+.3f}" for v in values)])  # fmt: skip
    attempts = [str(k + 1) for k in range(summary["attempts"])]
    trajectory = (image(figures.get("trajectory"), "trajectory")
                  + "<p>Mean reading over each reply, per attempt (episodes that got that "
                  "far); a star marks attempts where episodes first passed their tests.</p>"
                  + table(["condition", "emotion", *attempts], rows))  # fmt: skip
    sections = [("Grades", grades),
                ("Dose response", image(figures.get("dose"), "dose response")
                 + "<p>Rates against steering strength; 0 is unsteered.</p>"),
                ("Readout per attempt", trajectory)]  # fmt: skip
    example = summary["example"]
    if example:
        passed = (
            "never" if example["passed_at"] is None else f"at attempt {example['passed_at'] + 1}"
        )
        sections.append(("One episode", image(figures.get("episode"), "episode")
                         + f"<p>Task {esc(example['task'])} ({esc(example['kind'])}) under "
                         f"{esc(example['condition'])}: {esc(example['outcome'])}; tests passed "
                         f"{passed}. Trial {esc(example['trial'])}.</p>"))  # fmt: skip
    sections.append(("Tasks", table(["task", "kind", "source", "the shortcut it invites"],
                                    [[esc(t["id"]), esc(t["kind"]), esc(t["source"]),
                                      esc(t["hack"])] for t in summary["tasks"]], left=4)))  # fmt: skip
    t = summary["timing"]
    intro = (f'<p class="note">{summary["trials"]} episodes of up to {summary["attempts"]} '
             f"attempts, {t['seconds']:.0f} s of model and sandbox time "
             f"({t['seconds_per_trial']:.1f} s and {t['tokens_per_trial']:.0f} generated tokens "
             f"per episode; reply endings: {esc(', '.join(f'{k} {v}' for k, v in t['finish'].items()))}). Readout at layer "
             f"{summary['readout']['layer']}. Method: METHOD.md section 7 (reward hacking). "
             "Small models rarely hack: read the counts with their intervals.</p>")  # fmt: skip
    return experiment_page("emolens experiment: reward hacking", intro, sections)
