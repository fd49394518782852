"""Figures and the HTML page of the preference study, drawn from its summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emolens.experiments.page import esc, experiment_page, image, interval, table
from emolens.figures import save_figure

COLOURS = {"helpful": "#2ca02c", "engaging": "#17becf", "social": "#1f77b4",
           "self-curiosity": "#9467bd", "neutral": "#7f7f7f", "aversive": "#ff7f0e",
           "misaligned": "#d62728", "unsafe": "#8c564b"}  # fmt: skip


def draw(summary: dict, out: Path) -> dict[str, Path]:
    """elo.png, bias.png, probe.png and (with steered conditions) steering.png, layers.png."""
    from matplotlib.figure import Figure

    drawn = {}
    rows = sorted(summary["activities"], key=lambda r: r["elo"])
    figure = Figure(figsize=(13, 4.8))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(rows))
    colours = [COLOURS.get(r["category"], "#333333") for r in rows]
    left.bar(x, [r["elo"] - 1500 for r in rows], bottom=1500, color=colours)
    left.errorbar(x, [r["elo"] for r in rows], yerr=[[r["elo"] - r["low"] for r in rows],
                  [r["high"] - r["elo"] for r in rows]], fmt="none", ecolor="black", lw=0.6)  # fmt: skip
    left.set_xticks(x, [r["id"] for r in rows], rotation=90, fontsize=5.5)
    left.set_ylabel("Elo (bootstrap 95% interval)")
    left.set_title(f"activities by Elo ({summary['games']} choices)")
    names = list(summary["categories"])
    means = [summary["categories"][c]["elo"] for c in names]
    right.barh(names, [m - 1500 for m in means], left=1500,
               color=[COLOURS.get(c, "#333") for c in names])  # fmt: skip
    right.axvline(1500, color="black", lw=0.6)
    right.set_title("mean Elo per category")
    drawn["elo"] = save_figure(figure, out / "elo.png")

    bias = summary["bias"]
    figure = Figure(figsize=(6, 3.6))
    axes = figure.subplots()
    edges = np.array(bias["edges"])
    axes.bar((edges[:-1] + edges[1:]) / 2, bias["histogram"], width=np.diff(edges), color="#1f77b4")
    axes.axvline(0, color="black", lw=0.8)
    axes.set_xlabel("logit(A) - logit(B)")
    axes.set_ylabel("prompts")
    axes.set_title(f"position bias: A chosen {bias['a_rate']:.0%}; same winner in both orders "
                   f"{bias['consistent_pairs'] or 0:.0%}", fontsize=9)  # fmt: skip
    drawn["bias"] = save_figure(figure, out / "bias.png")

    probe = summary["probe"]
    if probe:
        layer, r, order = _probe_ranking(summary)
        shown = np.concatenate([order[:10], order[-10:]])
        figure = Figure(figsize=(13, 4.2))
        bars, lines = figure.subplots(1, 2)
        bars.barh([probe["emotions"][i] for i in shown], r[shown],
                  color=["#d62728" if r[i] < 0 else "#2ca02c" for i in shown])  # fmt: skip
        bars.set_xlabel(f"r of the probe reading with Elo (layer {layer})")
        bars.set_title("the 10 lowest and highest emotions", fontsize=10)
        per = probe["per_layer"]
        lines.plot(probe["layers"], [p["valence_r"]["value"] or np.nan for p in per], "o-",
                   label="r(probe r, valence)")  # fmt: skip
        lines.plot(probe["layers"], [p["arousal_r"]["value"] or np.nan for p in per], "s--",
                   label="r(probe r, arousal)")  # fmt: skip
        lines.plot(probe["layers"], [p["mean_abs_r"] for p in per], "^:", label="mean |probe r|")
        lines.axhline(0, color="black", lw=0.5)
        lines.set_xlabel("layer")
        lines.legend(fontsize=8)
        lines.set_title("probe correlations across layers", fontsize=10)
        drawn["probe"] = save_figure(figure, out / "probe.png")

    effects = summary["steering"]["effects"]
    if effects:
        figure = Figure(figsize=(7.5, 5.5))
        axes = figure.subplots()
        for e in effects:
            probe_x = e["probe_r"] if e["probe_r"] is not None else 0.0
            colour = "#7f7f7f" if e["random"] else "#1f77b4"
            axes.errorbar(probe_x, e["effect"], yerr=[[e["effect"] - e["low"]], [e["high"] - e["effect"]]],
                          fmt="o", color=colour, ms=4, lw=0.7)  # fmt: skip
            axes.annotate(e["emotion"], (probe_x, e["effect"]), fontsize=6.5, xytext=(3, 2),
                          textcoords="offset points")  # fmt: skip
        axes.axhline(0, color="black", lw=0.5)
        axes.set_xlabel("probe r (reading vs Elo) at the steered layer(s); random: 0")
        axes.set_ylabel("steering effect: change of steered - control Elo gap")
        axes.set_title(f"r = {interval(summary['steering']['effect_vs_probe_r'])}", fontsize=10)
        drawn["steering"] = save_figure(figure, out / "steering.png")
    sweep = summary["steering"]["by_layers"]
    if len(sweep) > 1:
        figure = Figure(figsize=(6.5, 3.8))
        axes = figure.subplots()
        labels = [s["layers"] for s in sweep]
        axes.plot(labels, [s["mean_abs_effect"] for s in sweep], "o-", label="mean |effect|")
        twin = axes.twinx()
        twin.plot(labels, [s["r"]["value"] or np.nan for s in sweep], "s--", color="#d62728",
                  label="r(effect, probe r)")  # fmt: skip
        axes.set_xlabel("steered layer(s)")
        axes.set_ylabel("mean |effect| (Elo)")
        twin.set_ylabel("r")
        axes.set_title("layer sweep", fontsize=10)
        drawn["layers"] = save_figure(figure, out / "layers.png")
    return drawn


def _probe_ranking(summary: dict) -> tuple[int, np.ndarray, np.ndarray]:
    """The headline probe layer, every emotion's probe r there, and their ascending order."""
    layer = _probe_layer(summary)
    r = np.array(summary["probe"]["r"][summary["probe"]["layers"].index(layer)])
    return layer, r, np.argsort(r)


def _probe_layer(summary: dict) -> int:
    """The layer the headline probe numbers use: the first steered layer, else the middle."""
    layers = summary["probe"]["layers"]
    for e in summary["steering"]["effects"]:
        if e["layers"] and e["layers"][0] in layers:
            return e["layers"][0]
    return layers[len(layers) // 2]


def html_page(summary: dict, figures: dict[str, Path]) -> str:
    """The preference study as one self-contained page."""
    categories = table(["category", "activities", "mean Elo", "mean Bradley-Terry"],
                       [[esc(c), v["n"], f"{v['elo']:.0f}", f"{v['bt']:.0f}"]
                        for c, v in summary["categories"].items()])  # fmt: skip
    ranked = sorted(summary["activities"], key=lambda r: -r["elo"])
    activities = table(["activity", "category", "Elo", "95% interval", "Bradley-Terry", "steered"],
                        [[esc(r["text"]), esc(r["category"]), f"{r['elo']:.0f}",
                          f"{r['low']:.0f} to {r['high']:.0f}", f"{r['bt']:.0f}",
                          "yes" if r["steered"] else ""] for r in ranked], left=2)  # fmt: skip
    bias = summary["bias"]
    sections = [
        ("Preferences", f"<p>{summary['games']} ordered choices; Elo from {summary['elo_range'][0]:.0f} "
         f"to {summary['elo_range'][1]:.0f}; Elo vs Bradley-Terry r "
         f"{interval(summary['elo_bt_r'])}.</p>" + image(figures.get("elo"), "Elo")
         + categories + activities),
        ("Position bias", f"<p>The model picks option A in {bias['a_rate']:.1%} of prompts (mean "
         f"logit difference {bias['mean_logit_difference']:+.3f}); an unordered pair gets the "
         f"same winner in both orders in {(bias['consistent_pairs'] or 0):.1%} of "
         f"{bias['pairs']} pairs.</p>" + image(figures.get("bias"), "bias")),
    ]  # fmt: skip
    probe = summary["probe"]
    if probe:
        layer, r, order = _probe_ranking(summary)
        rows = [[esc(probe["emotions"][i]), f"{r[i]:+.2f}"] for i in [*order[::-1][:5], *order[:5]]]
        per = {p["layer"]: p for p in probe["per_layer"]}[layer]
        sections.append(("Probe correlations", (
            f"<p>Emotions read on each activity's tokens of \"How would you feel about ...?\", "
            f"correlated with Elo across {probe['activities']} activities, at layer {layer}. The "
            f"per-emotion r tracks the valence ratings at r = {interval(per['valence_r'])} and "
            f"arousal at r = {interval(per['arousal_r'])}. Top 5 and bottom 5:</p>")
            + table(["emotion", "r with Elo"], rows) + image(figures.get("probe"), "probe")))  # fmt: skip
    steering = summary["steering"]
    if steering["effects"]:
        rows = [[esc(e["condition"]), f"{e['effect']:+.0f}", f"{e['low']:+.0f} to {e['high']:+.0f}",
                 e["flipped"], e["pairs"],
                 "n/a" if e["probe_r"] is None else f"{e['probe_r']:+.2f}"]
                for e in sorted(steering["effects"], key=lambda e: -e["effect"])]  # fmt: skip
        sections.append(("Steering", (
            "<p>Each condition steers the steered half's activity tokens; the pairs between the "
            "halves are run again. Effect: the change of the mean Bradley-Terry gap between the "
            "steered and the control half (paired bootstrap 95% interval). Across emotions, "
            f"effect vs probe r: r = {interval(steering['effect_vs_probe_r'])}.</p>")
            + image(figures.get("steering"), "steering") + image(figures.get("layers"), "layers")
            + table(["condition", "effect (Elo)", "95% interval", "choices flipped", "pairs",
                     "probe r"], rows)))  # fmt: skip
    intro = (
        f'<p class="note">{summary["trials"]} trials, {summary["seconds"]:.0f} s of model '
        "time. Method: METHOD.md section 7 (activity preferences).</p>"
    )
    return experiment_page("emolens experiment: activity preferences", intro, sections)
