"""The report's PNG figures. Each section's drawer takes its typed result and a folder and
returns {figure name: path} for the figures it has data for; `plot_steering` also stands alone."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from emolens import concepts
from emolens.evaluate.axes import Axes
from emolens.evaluate.geometry import BankGeometry, Geometry, LayerSimilarity
from emolens.evaluate.heldout import HeldoutTable
from emolens.evaluate.intensity import Intensity
from emolens.evaluate.scenarios import Scenarios
from emolens.evaluate.steering import SteeringResult
from emolens.evaluate.transfer import Transfer
from emolens.figures import save_figure
from emolens.report.results import AccuracySection, Compared
from emolens.report.text import signed


def accuracy(section: AccuracySection, out: Path) -> dict[str, Path]:
    """Held-out accuracy across layers: raw, denoised, word baseline, chance."""
    from matplotlib.figure import Figure

    table, base = section.table, section.baseline
    if table is None:
        return {}
    layers = list(table.layers)
    figure = Figure(figsize=(13, 3.8))
    panels = (("top1", "top-1, all emotions"), ("top5", "top-5, all emotions"),
              ("showcase_top1", "top-1 among the showcase emotions"))  # fmt: skip
    for axes, (key, title) in zip(figure.subplots(1, 3), panels, strict=True):

        def column(source: HeldoutTable, variant: str, key: str = key) -> list[float]:
            values = [getattr(source.layers[layer][variant], key) for layer in layers]
            return [math.nan if v is None else v for v in values]

        axes.plot(layers, column(table, "denoised"), "o-", color="#1f77b4", label="denoised")
        axes.plot(layers, column(table, "raw"), "s--", color="#ff7f0e", label="raw")
        if base:
            axes.plot(layers, column(base, "denoised"), "^:", color="#7f7f7f", label="words")
        chance = getattr(section.chance, key)
        if chance is not None:
            axes.axhline(chance, color="black", lw=0.7, ls=":", label="chance")
        axes.axvline(section.best_layer, color="#2ca02c", lw=0.8, alpha=0.6)
        axes.set_title(title, fontsize=10)
        axes.set_xticks(layers)
        axes.set_xlabel("layer")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("held-out accuracy")
    figure.axes[0].legend(fontsize=8)
    return {"accuracy": save_figure(figure, out / "accuracy.png")}


def geometry(section: BankGeometry, out: Path) -> dict[str, Path]:
    """Similarity heatmap, PC1/PC2 maps of vectors and words, similarity across layers."""
    return {
        "similarity": _similarity(section.vectors, out / "similarity.png"),
        "pca": _pca(section, out / "pca.png"),
        "rsa": _rsa(section.rsa, out / "rsa.png"),
    }


def _similarity(part: Geometry, path: Path) -> Path:
    """Cosine-similarity heatmap in hierarchical-clustering order."""
    from matplotlib.figure import Figure

    names = list(part.coordinates)
    order = [names.index(name) for name in part.order]
    matrix = np.asarray(part.similarity)[np.ix_(order, order)]
    n = len(order)
    size = min(16.0, max(5.0, n * 0.085))
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    font = max(2.5, min(8.0, 0.6 * size * 72 / max(n, 1)))  # a row's height in points
    shown = set(concepts.showcase())
    axes.set_xticks(range(n), part.order, rotation=90, fontsize=font)
    axes.set_yticks(range(n), part.order, fontsize=font)
    for label in [*axes.get_xticklabels(), *axes.get_yticklabels()]:
        if label.get_text() in shown:
            label.set_fontweight("bold")
    axes.set_title("cosine similarity of the emotion vectors (clustered order)")
    figure.colorbar(image, ax=axes, fraction=0.03)
    return save_figure(figure, path, dpi=150)


def _scatter(axes: Any, part: Geometry, title: str) -> Any:
    judged = concepts.ratings()
    names = list(part.coordinates)
    xy = np.asarray([part.coordinates[n][:2] for n in names])
    if xy.shape[1] < 2:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    valence = [judged.get(n.lower(), (math.nan, math.nan))[0] for n in names]
    points = axes.scatter(xy[:, 0], xy[:, 1], c=valence, cmap="coolwarm_r", vmin=1, vmax=7,
                          s=14, edgecolors="none")  # fmt: skip
    shown = set(concepts.showcase())
    for (x, y), name in zip(xy, names, strict=True):
        if name in shown:
            axes.annotate(name, (x, y), fontsize=9, fontweight="bold", xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
        else:
            axes.annotate(name, (x, y), fontsize=4.5, color="#555555", xytext=(2, 2),
                          textcoords="offset points")  # fmt: skip
    r = part.ratings.r
    explained = part.variance_explained
    axes.set_xlabel(f"PC1 ({explained[0]:.0%}; r valence {signed(r['PC1'].valence)})")
    if "PC2" in r:
        axes.set_ylabel(f"PC2 ({explained[1]:.0%}; r arousal {signed(r['PC2'].arousal)})")
    axes.set_title(title)
    axes.axhline(0, color="#999999", lw=0.5)
    axes.axvline(0, color="#999999", lw=0.5)
    return points


def _pca(section: BankGeometry, path: Path) -> Path:
    """PC1/PC2 scatter of the vectors and of the word baseline, coloured by valence."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 7.5))
    left, right = figure.subplots(1, 2)
    points = _scatter(left, section.vectors, "emotion vectors")
    _scatter(right, section.baseline, "word-embedding baseline")
    figure.colorbar(points, ax=[left, right], fraction=0.02, label="valence rating (1-7)")
    return save_figure(figure, path, dpi=120)


def _rsa(rsa: LayerSimilarity, path: Path) -> Path:
    """Correlation of similarity structure between every pair of bank layers."""
    from matplotlib.figure import Figure

    layers = rsa.layers
    matrix = np.asarray([[math.nan if v is None else v for v in row] for row in rsa.r])
    size = min(9.0, 2.5 + 0.45 * len(layers))
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=min(0.0, float(np.nanmin(matrix))), vmax=1)
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if len(layers) <= 14:
        for i in range(len(layers)):
            for j in range(len(layers)):
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if matrix[i, j] < 0.6 else "black")  # fmt: skip
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    axes.set_title("similarity structure across layers (r)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return save_figure(figure, path)


def scenarios(section: Compared[Scenarios], out: Path) -> dict[str, Path]:
    """Scenario x showcase-emotion scores, and their mean per intended emotion."""
    from matplotlib.figure import Figure

    result = section.vectors
    shown, items = result.showcase, result.items
    if not shown:
        return {}
    matrix = np.asarray(result.matrix, dtype=float).reshape(len(items), len(shown))
    figure = Figure(figsize=(13, max(5.0, 0.16 * len(items) + 1.5)))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    limit = max(float(np.abs(matrix).max()), 1e-9)
    left.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    left.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
    left.set_yticks(range(len(items)), [i.id.removeprefix("scenario-") for i in items],
                    fontsize=max(3.5, min(8.0, 400 / max(len(items), 1))))  # fmt: skip
    for row, item in enumerate(items):
        if item.emotion in shown:
            left.add_patch(_box(shown.index(item.emotion), row))
    left.set_title("score per scenario (box: intended emotion)", fontsize=10)
    by = result.by_emotion
    mean = np.asarray(by.relative, dtype=float).reshape(len(by.rows), len(shown))
    limit = max(float(np.abs(mean).max()) if mean.size else 0.0, 1e-9)
    image = right.imshow(mean, cmap="RdBu_r", vmin=-limit, vmax=limit)
    right.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
    right.set_yticks(range(len(by.rows)), by.rows, fontsize=8)
    for row, name in enumerate(by.rows):
        right.add_patch(_box(shown.index(name), row))
    right.set_xlabel("emotion read")
    right.set_ylabel("intended emotion")
    right.set_title(f"mean per intended emotion, relative to the mean scenario\n"
                    f"({by.diagonal_first}/{len(by.rows)} "
                    "rows peak on the diagonal)", fontsize=10)  # fmt: skip
    figure.colorbar(image, ax=right, fraction=0.046, label="projection")
    return {"scenarios": save_figure(figure, out / "scenarios.png")}


def _box(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.0)


def intensity(section: Compared[Intensity], out: Path) -> dict[str, Path]:
    """Per template: change of each emotion's score from the first value, over the values."""
    from matplotlib.figure import Figure

    templates = section.vectors.templates
    columns = 4
    rows = max(1, math.ceil(len(templates) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.3 * rows))
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, template in zip(grid, templates, strict=False):
        steps = range(len(template.values))
        for n, (emotion, curve) in enumerate(template.curves.items()):
            change = [v - curve[0] for v in curve]
            check = template.expect.get(emotion)
            if check:
                mark = "ok" if check.met else "x"
                label = f"{emotion} {check.direction} ({signed(check.rho)} {mark})"
                axes.plot(steps, change, "o-", ms=3, color=f"C{n}", label=label)
            else:
                axes.plot(steps, change, "--", lw=0.9, color=f"C{n}", alpha=0.7, label=emotion)
        axes.axhline(0, color="#999999", lw=0.5)
        axes.set_xticks(list(steps), [f"{v:g}" for v in template.values], fontsize=7)
        axes.set_title(template.id, fontsize=9)
        if template.curves:
            axes.legend(fontsize=6.5)
    for axes in grid[len(templates) :]:
        axes.set_visible(False)
    figure.supylabel("score change from the first value")
    figure.tight_layout()
    return {"intensity": save_figure(figure, out / "intensity.png")}


def steering(result: SteeringResult, out: Path) -> dict[str, Path]:
    """The steering dose-response figure."""
    return {"steering": plot_steering(result, out / "steering.png")}


def plot_steering(result: SteeringResult, path: str | os.PathLike) -> Path:
    """Three panels: word log-probability change vs strength (own, other, random; thin lines
    per emotion), the emotion x word change matrix at the reference strength, and the
    perplexity of steered text relative to unsteered."""
    from matplotlib.figure import Figure

    strengths, emotions, summary = result.strengths, result.emotions, result.summary
    figure = Figure(figsize=(16, 4.8))
    doses, matrix_axes, quality = figure.subplots(1, 3)
    for name in emotions:
        doses.plot(strengths, summary[name].own, color="#d62728", alpha=0.25, lw=0.8)

    def mean(key: str) -> list[float]:
        series = [getattr(summary[n], key) for n in emotions]
        return [sum(s[i] for s in series) / len(emotions) for i in range(len(strengths))]

    doses.plot(strengths, mean("own"), color="#d62728", lw=2.5, marker="o", label="own word")
    doses.plot(strengths, mean("other"), color="#1f77b4", lw=2, marker="o", label="other words")
    doses.plot(strengths, mean("random"), color="#7f7f7f", lw=2, marker="o", ls="--",
               label="own word, random direction")  # fmt: skip
    doses.axhline(0, color="black", lw=0.6)
    doses.set_xlabel("steering strength (fraction of mean residual norm)")
    doses.set_ylabel("change in log-probability (mean of probes)")
    doses.set_title(f"own word beats random: {result.beats_random_at_reference}/"
                    f"{result.beats_random.of} at {result.reference:g}")  # fmt: skip
    doses.legend(fontsize=8)

    ref = strengths.index(result.reference)
    probes = list(result.delta.values())
    grid = [[sum(p[e][w][ref] for p in probes) / len(probes) for w in emotions]
            for e in emotions]  # fmt: skip
    limit = max(1e-9, max(abs(v) for row in grid for v in row))
    image = matrix_axes.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
    matrix_axes.set_xticks(range(len(emotions)), emotions, rotation=60, fontsize=7)
    matrix_axes.set_yticks(range(len(emotions)), emotions, fontsize=7)
    matrix_axes.set_xlabel("word")
    matrix_axes.set_ylabel("steered emotion")
    matrix_axes.set_title(f"log-probability change at strength {strengths[ref]:g}")
    figure.colorbar(image, ax=matrix_axes, fraction=0.046)

    ppl = result.perplexity
    quality.plot(strengths, [p / ppl.unsteered for p in ppl.emotions], marker="o",
                 label="emotions")  # fmt: skip
    quality.plot(strengths, [p / ppl.unsteered for p in ppl.random], marker="o", ls="--",
                 color="#7f7f7f", label="random directions")  # fmt: skip
    quality.axhline(result.degrade_factor, color="#d62728", lw=0.8, ls=":")
    quality.set_xlabel("steering strength")
    quality.set_ylabel("perplexity / unsteered")
    degrades = result.degrades_at
    quality.set_title(
        "text degrades at " + (f"{degrades:g}" if degrades is not None else "no tested strength")
    )
    quality.legend(fontsize=8)
    figure.suptitle(f"{result.model}: steering at layer {result.layer}", fontsize=11)
    figure.tight_layout()
    return save_figure(figure, path)


def transfer(result: Transfer, out: Path) -> dict[str, Path]:
    """Top-1 per genre of the chosen reading, the word baseline and chance (second half)."""
    from matplotlib.figure import Figure

    from emolens.corpus import GENRES

    chosen = result.chosen
    words = result.words.get(chosen.replace(chosen.split("/")[2], "words"), {})
    figure = Figure(figsize=(8, 3.8))
    axes = figure.subplots()
    x = np.arange(len(GENRES))
    for offset, (label, rows) in zip(
        (-0.2, 0.2), ((chosen, result.second_half[chosen]), ("words", words)), strict=True
    ):
        values = [_value(rows[g].top1) if g in rows else math.nan for g in GENRES]
        axes.bar(x + offset, values, width=0.4, label=label)
    axes.axhline(result.chance["top1"], color="black", lw=0.8, ls=":", label="chance")
    axes.set_xticks(x, GENRES)
    axes.set_ylabel(f"top-1 among {len(result.emotions)} emotions")
    axes.set_title("cross-genre accuracy (texts not used to choose the reading)", fontsize=10)
    axes.legend(fontsize=8)
    return {"transfer": save_figure(figure, out / "transfer.png")}


def axes(result: Axes, out: Path) -> dict[str, Path]:
    """Variance and rating correlations of the top principal components."""
    from matplotlib.figure import Figure

    components = result.components
    labels = [f"PC{c.index}" for c in components]
    figure = Figure(figsize=(9, 3.6))
    left, right = figure.subplots(1, 2)
    left.bar(labels, [c.variance for c in components], color="#1f77b4")
    left.set_ylabel("variance explained")
    left.tick_params(axis="x", labelsize=7)
    x = np.arange(len(components))
    right.bar(x - 0.2, [c.valence_r or 0.0 for c in components], width=0.4, label="valence")
    right.bar(x + 0.2, [c.arousal_r or 0.0 for c in components], width=0.4, label="arousal")
    right.set_xticks(x, labels, fontsize=7)
    right.axhline(0, color="black", lw=0.5)
    right.set_ylabel("r with the ratings")
    right.legend(fontsize=8)
    figure.suptitle(f"leave-one-out fit from all components: valence r {signed(result.fit_valence_r)}, "
                    f"arousal r {signed(result.fit_arousal_r)}", fontsize=9)  # fmt: skip
    return {"axes": save_figure(figure, out / "axes.png")}


def _value(value: float | None) -> float:
    return math.nan if value is None else value
