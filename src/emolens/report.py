"""Validation report: every number in report.json, PNG figures, one self-contained HTML page.

Sections (METHOD.md 4-5): held-out accuracy per layer, geometry (similarity, PCA against
valence/arousal ratings, k-means, similarity across layers), the word-embedding baseline,
logit lens, implicit scenarios, intensity templates and, when available, steering.
In report.json a null marks a value that is undefined (a correlation of a constant or over
fewer than three words, an accuracy with no showcase story held out, a missing section).
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from emolens import __version__, concepts
from emolens.atomic import atomic_path
from emolens.bank import EmotionBank, default_bank_path
from emolens.corpus import scenarios as load_scenarios
from emolens.corpus import templates as load_templates
from emolens.errors import EmolensError
from emolens.evaluate import geometry as geo
from emolens.evaluate.baseline import baseline_bank
from emolens.evaluate.heldout import HeldoutTable, heldout_accuracy
from emolens.evaluate.intensity import filled, score_templates
from emolens.evaluate.logit_lens import logit_lens
from emolens.evaluate.scenarios import last_token_states, project, score_scenarios
from emolens.figures import save_figure
from emolens.models import LoadedModel
from emolens.readout import resolve_layer

VARIANT = "denoised"
KMEANS = {"k": 10, "seed": 0}


def write_report(
    lm: LoadedModel,
    bank: EmotionBank | str | os.PathLike,
    out: str | os.PathLike,
    *,
    heldout: str | os.PathLike | None = None,
    norms: str | os.PathLike | None = None,
    steering: bool = True,
    progress: bool = True,
    layer: int | None = None,
) -> dict:
    """Evaluate `bank` (an EmotionBank or a bank file) on `lm`; write report.json, the PNG
    figures and report.html into `out`; return the report dict (see `headline`).

    `heldout` is the build's heldout.safetensors (default: beside the bank file, or in the
    model's default build folder, if it matches the bank). `norms` is a CSV of human ratings
    (word, valence, arousal). `layer` is the analysis layer (default: the bank's).
    """
    started = time.perf_counter()
    bank, bank_path = _load_bank(bank)
    layer = resolve_layer(lm, bank, layer)
    heldout_path, heldout_note = find_heldout(lm, bank, bank_path, heldout)
    human = concepts.ratings(norms) if norms is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = _Steps(progress)
    report: dict[str, Any] = {
        "emolens": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": dict(lm.fingerprint),
        "bank": {"path": str(bank_path) if bank_path else None, "emotions": len(bank.emotions),
                 "layers": bank.layers, "default_layer": bank.default_layer,
                 "kind": bank.kind},
        "layer": layer,
        "variant": VARIANT,
    }  # fmt: skip
    with step("baseline vectors"):
        base = baseline_bank(lm, bank)
    with step("held-out accuracy"):
        report["accuracy"] = accuracy_section(bank, base, heldout_path, heldout_note)
    with step("geometry"):
        report["geometry"] = geometry_section(bank, base, layer, human, norms)
    with step("logit lens"):
        report["logit_lens"] = logit_lens(lm, bank.matrix(layer, VARIANT), bank.emotions)
    with step("scenarios and intensity"):
        report["scenarios"], report["intensity"] = reading_sections(lm, bank, base, layer)
    report["steering"] = None
    if steering:
        with step("steering"):
            report["steering"] = steering_section(lm, bank, layer, out)
    report["headline"] = headline(report)
    with step("figures"):
        figures = draw_figures(report, out)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["step_seconds"] = step.seconds
    report["figures"] = {name: path.name for name, path in figures.items()}
    report = clean(report)
    _write_atomic(out / "report.json", json.dumps(report, indent=1, allow_nan=False))
    _write_atomic(out / "report.html", render_html(report, figures))
    if progress:
        print(f"report: wrote {out / 'report.html'} in {report['seconds']} s", file=sys.stderr)
    return report


def _load_bank(bank: EmotionBank | str | os.PathLike) -> tuple[EmotionBank, Path | None]:
    if isinstance(bank, EmotionBank):
        return bank, None
    return EmotionBank.load(bank), Path(bank)


class _Steps:
    """A line per report step on stderr, with its time; `seconds` keeps every step's time."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            print(f"report: {name} ...", file=sys.stderr, flush=True)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.enabled:
            print(f"report: {name} done ({self.seconds[name]:.1f} s)", file=sys.stderr)


# ---------------------------------------------------------------- held-out accuracy


def heldout_mismatch(path: Path, bank: EmotionBank) -> str | None:
    """Why a heldout.safetensors cannot score `bank` (other emotions or layers), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
        emotions, layers = json.loads(meta["emotions"]), json.loads(meta["layers"])
    except Exception as error:  # safetensors raises its own types on a bad file
        return f"not a held-out file written by emolens build ({error})"
    if not {"pooled", "labels"} <= keys:
        return "lacks the tensors 'pooled' and 'labels'"
    if emotions != bank.emotions:
        return f"its {len(emotions)} emotions are not the bank's {len(bank.emotions)}"
    if [int(x) for x in layers] != bank.layers:
        return f"its layers {layers} are not the bank's {bank.layers}"
    return None


def find_heldout(
    lm: LoadedModel,
    bank: EmotionBank,
    bank_path: Path | None,
    given: str | os.PathLike | None,
) -> tuple[Path | None, str]:
    """The held-out set to score: `given` (checked; an error if unusable), else the first
    matching heldout.safetensors beside the bank file or in the default build folder."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise EmolensError(f"{path}: no such held-out file")
        problem = heldout_mismatch(path, bank)
        if problem:
            raise EmolensError(f"{path}: {problem}")
        return path, f"recomputed from {path}"
    places = [bank_path.parent] if bank_path else []
    places.append(default_bank_path(lm.fingerprint).parent)
    for place in places:
        path = place / "heldout.safetensors"
        if path.is_file() and heldout_mismatch(path, bank) is None:
            return path, f"recomputed from {path}"
    return None, "no matching heldout.safetensors found"


def accuracy_section(bank: EmotionBank, base: EmotionBank, path: Path | None, note: str) -> dict:
    """Per-layer held-out accuracy of the bank (raw, denoised) and of the word baseline."""
    table = heldout_accuracy(bank, path).to_json() if path else bank.meta.get("heldout")
    if table is None:
        return {"source": note, "table": None, "baseline": None, "best_layer": None}
    if path is None:
        note = "from the bank's build metadata (no held-out file: no baseline accuracy)"
    baseline = heldout_accuracy(base, path).to_json() if path else None
    shown = sum(e in bank.emotions for e in concepts.showcase())
    return {
        "source": note,
        "table": table,
        "baseline": baseline,
        "best_layer": HeldoutTable.from_json(table).best_layer,
        "showcase": shown,
        "chance": {"top1": 1 / len(bank.emotions), "top5": min(1.0, 5 / len(bank.emotions)),
                   "showcase_top1": 1 / shown if shown else None},
    }  # fmt: skip


# ---------------------------------------------------------------- geometry


def geometry_section(
    bank: EmotionBank,
    base: EmotionBank,
    layer: int,
    human: dict | None,
    norms: str | os.PathLike | None,
) -> dict:
    """Geometry of the bank's vectors at `layer` and of the word baseline, similarity across
    layers (RSA) and how much of the similarity structure the words alone share."""
    judged = concepts.ratings()
    index = bank.layer_index(layer)
    vectors = bank.vectors[VARIANT][index].double().numpy()
    words = base.vectors[VARIANT][index].double().numpy()
    result = {
        "vectors": geo.geometry(vectors, bank.emotions, judged, norms=human, **KMEANS),
        "baseline": geo.geometry(words, bank.emotions, judged, norms=human, **KMEANS),
        "ratings_source": "shipped judge ratings (valence, arousal 1-7) of the 171 emotions",
        "norms_source": str(norms) if norms is not None else None,
        "kmeans": KMEANS,
    }
    similarity = [geo.cosine_matrix(v.double().numpy()) for v in bank.vectors[VARIANT]]
    result["rsa"] = {
        "layers": bank.layers,
        "r": [[round(float(v), 4) for v in row] for row in geo.rsa(similarity)],
    }
    result["baseline_similarity_r"] = geo.pearson(
        geo.upper(similarity[index]), geo.upper(geo.cosine_matrix(words))
    )
    return result


# ---------------------------------------------------------------- scenarios, intensity


def reading_sections(
    lm: LoadedModel, bank: EmotionBank, base: EmotionBank, layer: int
) -> tuple[dict, dict]:
    """Scenario and intensity readings of the bank and the baseline (one batched read)."""
    rows, templates = load_scenarios(), load_templates()
    texts = [row["text"] for row in rows] + [text for t in templates for text in filled(t)]
    states = last_token_states(lm, texts, layer)
    sections = []
    for source in (bank, base):
        scores = project(states, source, layer, VARIANT)
        sections.append(
            (
                score_scenarios(rows, scores[: len(rows)], bank.emotions, concepts.showcase()),
                score_templates(templates, scores[len(rows) :], bank.emotions),
            )
        )
    (scenarios, intensity), (base_scenarios, base_intensity) = sections
    scenarios["baseline"] = {
        key: base_scenarios[key] for key in ("first", "first_relative", "total", "items")
    }
    intensity["baseline"] = {
        "met": base_intensity["met"],
        "total": base_intensity["total"],
        "expect": {t["id"]: t["expect"] for t in base_intensity["templates"]},
    }
    return scenarios, intensity


# ---------------------------------------------------------------- steering


def steering_section(lm: LoadedModel, bank: EmotionBank, layer: int, out: Path) -> dict | None:
    """evaluate_steering's result (its figure saved as steering.png), or None when emolens
    has no steering evaluation or the bank has none of the showcase emotions it steers."""
    if importlib.util.find_spec("emolens.evaluate.steering") is None:
        return None
    if not set(concepts.showcase()) & set(bank.emotions):
        return None
    from emolens.evaluate.steering import evaluate_steering, plot_steering

    result = evaluate_steering(lm, bank, layer=layer, variant=VARIANT)
    plot_steering(result, out / "steering.png")
    return result


# ---------------------------------------------------------------- headline


def headline(report: dict) -> dict:
    """The numbers that summarise the report, for the vectors and the word baseline."""
    accuracy, geometry = report["accuracy"], report["geometry"]
    best = accuracy["best_layer"]

    def at_best(table: dict | None) -> dict:
        row = table["layers"][str(best)][VARIANT] if table and best is not None else {}
        return {key: row.get(key) for key in ("top1", "top5", "showcase_top1")}

    def shape(part: dict) -> dict:
        return {
            "pc1_valence_r": part["ratings"]["r"]["PC1"]["valence"],
            "pc2_arousal_r": part["ratings"]["r"].get("PC2", {}).get("arousal"),
        }

    scenarios, intensity = report["scenarios"], report["intensity"]
    vectors = {
        "best_layer": best,
        "layer": report["layer"],
        **at_best(accuracy["table"]),
        **shape(geometry["vectors"]),
        "scenarios_first": scenarios["first"],
        "scenarios_first_relative": scenarios["first_relative"],
        "scenarios_total": scenarios["total"],
        "intensity_met": intensity["met"],
        "intensity_total": intensity["total"],
    }
    vectors["baseline"] = {
        **at_best(accuracy["baseline"]),
        **shape(geometry["baseline"]),
        "scenarios_first": scenarios["baseline"]["first"],
        "scenarios_first_relative": scenarios["baseline"]["first_relative"],
        "scenarios_total": scenarios["baseline"]["total"],
        "intensity_met": intensity["baseline"]["met"],
        "intensity_total": intensity["baseline"]["total"],
    }
    steering = report.get("steering")
    if steering:
        vectors["steering_beats_random"] = steering["beats_random"]["count"]
        vectors["steering_of"] = steering["beats_random"]["of"]
        vectors["steering_reference"] = steering["beats_random"]["reference"]
    return vectors


def headline_text(report: dict) -> str:
    """A few terminal lines: the headline numbers, vectors and word baseline side by side."""
    head, base = report["headline"], report["headline"]["baseline"]
    best, shown = head["best_layer"], len(report["scenarios"]["showcase"])

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    def r(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    lines = [
        f"{report['model'].get('name')}: {report['bank']['emotions']} emotions, geometry and "
        f"readings at layer {report['layer']}"
        + (f", best held-out layer {best}" if best is not None else ""),
        f"{'':34}{'vectors':>9}{'words':>9}",
        f"{'held-out top-1 (all emotions)':34}{pct(head['top1']):>9}{pct(base['top1']):>9}",
        f"{'held-out top-5 (all emotions)':34}{pct(head['top5']):>9}{pct(base['top5']):>9}",
        f"{'held-out top-1 (showcase only)':34}{pct(head['showcase_top1']):>9}"
        f"{pct(base['showcase_top1']):>9}",
        f"{'PC1 ~ valence r':34}{r(head['pc1_valence_r']):>9}{r(base['pc1_valence_r']):>9}",
        f"{'PC2 ~ arousal r':34}{r(head['pc2_arousal_r']):>9}{r(base['pc2_arousal_r']):>9}",
        f"{f'scenarios: intended first of {shown}':34}"
        f"{head['scenarios_first']:>4}/{head['scenarios_total']:<4}"
        f"{base['scenarios_first']:>4}/{base['scenarios_total']:<4}",
        f"{'  same, relative to mean scenario':34}"
        f"{head['scenarios_first_relative']:>4}/{head['scenarios_total']:<4}"
        f"{base['scenarios_first_relative']:>4}/{base['scenarios_total']:<4}",
        f"{'intensity expectations met':34}"
        f"{head['intensity_met']:>4}/{head['intensity_total']:<4}"
        f"{base['intensity_met']:>4}/{base['intensity_total']:<4}",
    ]
    if "steering_beats_random" in head:
        lines.append(
            f"steering: own word beats random directions for {head['steering_beats_random']}/"
            f"{head['steering_of']} emotions at strength {head['steering_reference']:g}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- JSON


def clean(value: Any) -> Any:
    """JSON-ready: numpy and torch scalars to Python, tuples to lists, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # a torch scalar
        return clean(value.item())
    return value


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- figures


def draw_figures(report: dict, out: Path) -> dict[str, Path]:
    """Every figure the report has data for, as PNG files in `out`."""
    geometry = report["geometry"]
    drawn = {
        "similarity": figure_similarity(geometry["vectors"], out / "similarity.png"),
        "pca": figure_pca(geometry, out / "pca.png"),
        "rsa": figure_rsa(geometry["rsa"], out / "rsa.png"),
        "intensity": figure_intensity(report["intensity"], out / "intensity.png"),
    }
    if report["scenarios"]["showcase"]:
        drawn["scenarios"] = figure_scenarios(report["scenarios"], out / "scenarios.png")
    if report["accuracy"]["table"]:
        drawn["accuracy"] = figure_accuracy(report["accuracy"], out / "accuracy.png")
    if report.get("steering") and (out / "steering.png").is_file():
        drawn["steering"] = out / "steering.png"
    return drawn


def figure_accuracy(section: dict, path: Path) -> Path:
    """Held-out accuracy across layers: raw, denoised, word baseline, chance."""
    from matplotlib.figure import Figure

    table, base = section["table"], section["baseline"]
    layers = [int(layer) for layer in table["layers"]]
    figure = Figure(figsize=(13, 3.8))
    panels = (("top1", "top-1, all emotions"), ("top5", "top-5, all emotions"),
              ("showcase_top1", "top-1 among the showcase emotions"))  # fmt: skip
    for axes, (key, title) in zip(figure.subplots(1, 3), panels, strict=True):

        def column(source: dict, variant: str, key: str = key) -> list[float]:
            values = [source["layers"][str(layer)][variant][key] for layer in layers]
            return [math.nan if v is None else v for v in values]

        axes.plot(layers, column(table, "denoised"), "o-", color="#1f77b4", label="denoised")
        axes.plot(layers, column(table, "raw"), "s--", color="#ff7f0e", label="raw")
        if base:
            axes.plot(layers, column(base, VARIANT), "^:", color="#7f7f7f", label="words")
        if section["chance"][key] is not None:
            axes.axhline(section["chance"][key], color="black", lw=0.7, ls=":", label="chance")
        axes.axvline(section["best_layer"], color="#2ca02c", lw=0.8, alpha=0.6)
        axes.set_title(title, fontsize=10)
        axes.set_xticks(layers)
        axes.set_xlabel("layer")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("held-out accuracy")
    figure.axes[0].legend(fontsize=8)
    return save_figure(figure, path)


def figure_similarity(part: dict, path: Path) -> Path:
    """Cosine-similarity heatmap in hierarchical-clustering order."""
    from matplotlib.figure import Figure

    names = list(part["coordinates"])
    order = [names.index(name) for name in part["order"]]
    matrix = np.asarray(part["similarity"])[np.ix_(order, order)]
    n = len(order)
    size = min(16.0, max(5.0, n * 0.085))
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    font = max(2.5, min(8.0, 0.6 * size * 72 / max(n, 1)))  # a row's height in points
    shown = set(concepts.showcase())
    axes.set_xticks(range(n), part["order"], rotation=90, fontsize=font)
    axes.set_yticks(range(n), part["order"], fontsize=font)
    for label in [*axes.get_xticklabels(), *axes.get_yticklabels()]:
        if label.get_text() in shown:
            label.set_fontweight("bold")
    axes.set_title("cosine similarity of the emotion vectors (clustered order)")
    figure.colorbar(image, ax=axes, fraction=0.03)
    return save_figure(figure, path, dpi=150)


def _scatter(axes: Any, part: dict, title: str) -> Any:
    judged = concepts.ratings()
    names = list(part["coordinates"])
    xy = np.asarray([part["coordinates"][n][:2] for n in names])
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
    r = part["ratings"]["r"]
    explained = part["variance_explained"]
    axes.set_xlabel(f"PC1 ({explained[0]:.0%}; r valence {_num(r['PC1']['valence'])})")
    if "PC2" in r:
        axes.set_ylabel(f"PC2 ({explained[1]:.0%}; r arousal {_num(r['PC2']['arousal'])})")
    axes.set_title(title)
    axes.axhline(0, color="#999999", lw=0.5)
    axes.axvline(0, color="#999999", lw=0.5)
    return points


def figure_pca(geometry: dict, path: Path) -> Path:
    """PC1/PC2 scatter of the vectors and of the word baseline, coloured by valence."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 7.5))
    left, right = figure.subplots(1, 2)
    points = _scatter(left, geometry["vectors"], "emotion vectors")
    _scatter(right, geometry["baseline"], "word-embedding baseline")
    figure.colorbar(points, ax=[left, right], fraction=0.02, label="valence rating (1-7)")
    return save_figure(figure, path, dpi=120)


def figure_rsa(rsa: dict, path: Path) -> Path:
    """Correlation of similarity structure between every pair of bank layers."""
    from matplotlib.figure import Figure

    layers, matrix = rsa["layers"], np.asarray(rsa["r"], dtype=float)
    size = min(9.0, 2.5 + 0.45 * len(layers))
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=min(0.0, float(np.nanmin(matrix))), vmax=1)
    axes.set_xticks(range(len(layers)), layers)
    axes.set_yticks(range(len(layers)), layers)
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


def figure_scenarios(section: dict, path: Path) -> Path:
    """Scenario x showcase-emotion scores, and their mean per intended emotion."""
    from matplotlib.figure import Figure

    shown, items = section["showcase"], section["items"]
    matrix = np.asarray(section["matrix"], dtype=float).reshape(len(items), len(shown))
    figure = Figure(figsize=(13, max(5.0, 0.16 * len(items) + 1.5)))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    limit = max(float(np.abs(matrix).max()), 1e-9)
    left.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    left.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
    left.set_yticks(range(len(items)), [i["id"].removeprefix("scenario-") for i in items],
                    fontsize=max(3.5, min(8.0, 400 / max(len(items), 1))))  # fmt: skip
    for row, item in enumerate(items):
        if item["emotion"] in shown:
            left.add_patch(_box(shown.index(item["emotion"]), row))
    left.set_title("score per scenario (box: intended emotion)", fontsize=10)
    by = section["by_emotion"]
    mean = np.asarray(by["relative"], dtype=float).reshape(len(by["rows"]), len(shown))
    limit = max(float(np.abs(mean).max()) if mean.size else 0.0, 1e-9)
    image = right.imshow(mean, cmap="RdBu_r", vmin=-limit, vmax=limit)
    right.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
    right.set_yticks(range(len(by["rows"])), by["rows"], fontsize=8)
    for row, name in enumerate(by["rows"]):
        right.add_patch(_box(shown.index(name), row))
    right.set_xlabel("emotion read")
    right.set_ylabel("intended emotion")
    right.set_title(f"mean per intended emotion, relative to the mean scenario\n"
                    f"({by['diagonal_first']}/{len(by['rows'])} "
                    "rows peak on the diagonal)", fontsize=10)  # fmt: skip
    figure.colorbar(image, ax=right, fraction=0.046, label="projection")
    return save_figure(figure, path)


def _box(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.0)


def figure_intensity(section: dict, path: Path) -> Path:
    """Per template: change of each emotion's score from the first value, over the values."""
    from matplotlib.figure import Figure

    templates = section["templates"]
    columns = 4
    rows = max(1, math.ceil(len(templates) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.3 * rows))
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, template in zip(grid, templates, strict=False):
        steps = range(len(template["values"]))
        for n, (emotion, curve) in enumerate(template["curves"].items()):
            change = [v - curve[0] for v in curve]
            check = template["expect"].get(emotion)
            if check:
                mark = "ok" if check["met"] else "x"
                label = f"{emotion} {check['direction']} ({_num(check['rho'])} {mark})"
                axes.plot(steps, change, "o-", ms=3, color=f"C{n}", label=label)
            else:
                axes.plot(steps, change, "--", lw=0.9, color=f"C{n}", alpha=0.7, label=emotion)
        axes.axhline(0, color="#999999", lw=0.5)
        axes.set_xticks(list(steps), [f"{v:g}" for v in template["values"]], fontsize=7)
        axes.set_title(template["id"], fontsize=9)
        if template["curves"]:
            axes.legend(fontsize=6.5)
    for axes in grid[len(templates) :]:
        axes.set_visible(False)
    figure.supylabel("score change from the first value")
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;display:block;margin:.8em 0}
.note{color:#555;font-size:.9em}.ok{color:#1a7f37}.no{color:#b42318}
code,pre{background:#f6f6f6;padding:.1em .3em}nav a{margin-right:1em}
"""


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{value}</{tag}>"

    head = "".join(cell("th", i, html.escape(str(h))) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _esc(value: Any) -> str:
    return html.escape(str(value))


def render_html(report: dict, figures: dict[str, Path]) -> str:
    """The report as one HTML page: inline CSS, figures as data URIs, no external requests."""
    sections = [
        ("accuracy", "1. Held-out accuracy per layer", _html_accuracy(report, figures)),
        ("geometry", "2. Geometry", _html_geometry(report, figures)),
        ("baseline", "3. Word-embedding baseline", _html_baseline(report)),
        ("logit-lens", "4. Logit lens", _html_logit_lens(report)),
        ("scenarios", "5. Implicit scenarios", _html_scenarios(report, figures)),
        ("intensity", "6. Intensity templates", _html_intensity(report, figures)),
        ("steering", "7. Steering", _html_steering(report, figures)),
    ]
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{content}</section>'
        for key, title, content in sections
    )
    model = report["model"]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>emolens report: {_esc(model.get('name'))}</title><style>{CSS}</style></head>"
        f"<body><h1>emolens validation report: {_esc(model.get('name'))}</h1>"
        f'<p class="note">{_esc(model.get("architecture"))}, {model.get("depth")} layers, width '
        f"{model.get('width')}, weights {_esc(model.get('weights'))}; bank of "
        f"{report['bank']['emotions']} emotions at layers {report['bank']['layers']}; analysis "
        f"layer {report['layer']} ({VARIANT} vectors). emolens {_esc(report['emolens'])}, "
        f"{_esc(report['created'])}, {report['seconds']} s.</p>"
        f"<h2>Headline</h2><pre>{_esc(headline_text(report))}</pre><nav>{nav}</nav>{body}"
        "</body></html>"
    )


def _html_accuracy(report: dict, figures: dict[str, Path]) -> str:
    section = report["accuracy"]
    table = section["table"]
    if not table:
        return f'<p class="note">No held-out data: {_esc(section["source"])}.</p>'
    base = section["baseline"]
    rows = []
    for layer, row in table["layers"].items():
        words = base["layers"][layer][VARIANT] if base else {}
        mark = " (best)" if int(layer) == section["best_layer"] else ""
        rows.append(
            [f"{layer}{mark}"]
            + [_pct(row[v][key]) for key in ("top1", "top5", "showcase_top1")
               for v in ("raw", "denoised")]
            + [_pct(words.get(key)) for key in ("top1", "top5", "showcase_top1")]
        )  # fmt: skip
    header = ["layer", "top-1 raw", "top-1 denoised", "top-5 raw", "top-5 denoised",
              "showcase raw", "showcase denoised", "words top-1", "words top-5", "words showcase"]  # fmt: skip
    chance = section["chance"]
    return (
        f"<p>{table['n']} held-out stories ({len(report['geometry']['vectors']['order'])}-way "
        f"classification: the centred pooled activation projected on every unit vector), "
        f"{table['n_showcase']} of them for the {section['showcase']} showcase emotions in the "
        "bank (the showcase columns classify these among the showcase emotions only). Chance: "
        f"top-1 {_pct(chance['top1'])}, top-5 {_pct(chance['top5'])}, showcase "
        f"{_pct(chance['showcase_top1'])}. The word baseline is scored the same way "
        f'(section 3). <span class="note">Source: {_esc(section["source"])}.</span></p>'
        + _table(header, rows)
        + _image(figures.get("accuracy"), "held-out accuracy per layer")
    )


def _ratings_rows(part: dict, key: str) -> list[list[str]]:
    block = part.get(key)
    if not block:
        return []
    return [
        [pc, block["n"], _num(r["valence"]), _num(r["arousal"])] for pc, r in block["r"].items()
    ]


def _clusters(part: dict) -> str:
    rows = [[_esc(c["label"]), c["size"], _esc(", ".join(c["members"]))] for c in part["clusters"]]
    return _table(["cluster (nearest the centroid)", "size", "members (closest first)"], rows, 3)


def _html_geometry(report: dict, figures: dict[str, Path]) -> str:
    geometry = report["geometry"]
    part = geometry["vectors"]
    variance = ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(part["variance_explained"][:5]))
    flips = ", ".join(pc for pc, f in part["flipped"].items() if f) or "none"
    rows = _ratings_rows(part, "ratings")
    norm_rows = _ratings_rows(part, "norms")
    norms = (
        f"<p>Against the human norms in <code>{_esc(geometry['norms_source'])}</code> "
        f"(overlapping words only, same PC orientation):</p>"
        + _table(["PC", "n", "r valence", "r arousal"], norm_rows)
        if norm_rows
        else '<p class="note">No human norms given (use <code>--norms CSV</code>).</p>'
    )
    rsa = geometry["rsa"]
    return (
        f"<p>Layer {report['layer']}, {part['n']} {VARIANT} vectors. Cosine similarity, ordered "
        "by average-linkage hierarchical clustering:</p>"
        + _image(figures.get("similarity"), "cosine similarity heatmap")
        + f"<p>PCA of the unit vectors: variance explained {variance}. Principal components "
        "have no intrinsic sign: PC1 and PC3 are oriented so that their r with valence is "
        f"positive, PC2 so that its r with arousal is positive (flipped here: {flips}). "
        f"Correlations with the {_esc(geometry['ratings_source'])}:</p>"
        + _table(["PC", "n", "r valence", "r arousal"], rows)
        + norms
        + _image(figures.get("pca"), "PC1/PC2 scatter")
        + f"<p>k-means (k = {geometry['kmeans']['k']}, seed {geometry['kmeans']['seed']}, "
        "k-means++ start, on unit vectors; empty clusters dropped):</p>"
        + _clusters(part)
        + "<p>Similarity structure across layers: Pearson r between the upper triangles of the "
        f"cosine-similarity matrices of every pair of bank layers {rsa['layers']}.</p>"
        + _image(figures.get("rsa"), "similarity structure across layers")
    )


def _html_baseline(report: dict) -> str:
    geometry = report["geometry"]
    part = geometry["baseline"]
    head, base = report["headline"], report["headline"]["baseline"]
    rows = [
        ["held-out top-1 (best layer)", _pct(head["top1"]), _pct(base["top1"])],
        ["held-out top-5 (best layer)", _pct(head["top5"]), _pct(base["top5"])],
        ["held-out top-1, showcase only", _pct(head["showcase_top1"]), _pct(base["showcase_top1"])],
        ["PC1 ~ valence r", _num(head["pc1_valence_r"]), _num(base["pc1_valence_r"])],
        ["PC2 ~ arousal r", _num(head["pc2_arousal_r"]), _num(base["pc2_arousal_r"])],
        [f"scenarios: intended first of {len(report['scenarios']['showcase'])}", f"{head['scenarios_first']}/{head['scenarios_total']}",
         f"{base['scenarios_first']}/{base['scenarios_total']}"],
        ["intensity expectations met", f"{head['intensity_met']}/{head['intensity_total']}",
         f"{base['intensity_met']}/{base['intensity_total']}"],
    ]  # fmt: skip
    return (
        "<p>Word embeddings alone show some emotion structure, so every check is repeated "
        "with vectors built from the words: the mean input embedding of the tokens of "
        '" word", centred over the emotions. They are scored exactly like the bank (same '
        "centre, same layers); only the directions differ.</p>"
        + _table(["", "vectors", "words"], rows)
        + "<p>Similarity structure shared with the words (r of the cosine matrices' upper "
        f"triangles at layer {report['layer']}): {_num(geometry['baseline_similarity_r'])}. "
        f"Baseline PCA variance explained: "
        + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(part["variance_explained"][:3]))
        + ".</p>"
        + _table(["PC", "n", "r valence", "r arousal"], _ratings_rows(part, "ratings"))
        + "<p>k-means of the word vectors:</p>"
        + _clusters(part)
    )


def _html_logit_lens(report: dict) -> str:
    lens = report["logit_lens"]
    shown = [e for e in concepts.showcase() if e in lens["emotions"]]

    def tokens(pairs: list) -> str:
        return " ".join(f"<code>{_esc(repr(text))}</code>" for text, _ in pairs)

    rows = [[_esc(e), tokens(lens["emotions"][e]["top"]), tokens(lens["emotions"][e]["bottom"])]
            for e in shown]  # fmt: skip
    return (
        f"<p>Top and bottom {lens['k']} tokens of each {VARIANT} vector at layer "
        f"{report['layer']}: {_esc(lens['note'])}. Showcase emotions here; all emotions, with "
        "logits, in report.json.</p>" + _table(["emotion", "promoted", "suppressed"], rows, 3)
    )


def _html_scenarios(report: dict, figures: dict[str, Path]) -> str:
    section = report["scenarios"]
    base = section["baseline"]
    n_shown = len(section["showcase"])

    def mean(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    rows = [
        [_esc(item["id"]), _esc(item["emotion"]), item["rank_showcase"] or "n/a",
         item["rank_relative"] or "n/a", item["rank_all"] or "n/a",
         b["rank_showcase"] or "n/a", _esc(", ".join(item["top"])),
         f'<span class="note">{_esc(item["text"])}</span>']
        for item, b in zip(section["items"], base["items"], strict=True)
    ]  # fmt: skip
    header = ["scenario", "intended", f"rank of {n_shown}", f"relative rank of {n_shown}",
              f"rank of {section['of_all']}", f"words: rank of {n_shown}", "top 3 (all)", "text"]  # fmt: skip
    return (
        f"<p>Each scenario is one user message; the residual at layer {report['layer']} is read "
        "at the last token before the Assistant's reply (the end of the assistant header, or "
        'the ":" of "Assistant:") and projected on the centred unit vectors. The intended '
        f"emotion ranks first among the {n_shown} showcase emotions in "
        f"<b>{section['first']}/{section['total']}</b> scenarios (words: {base['first']}/"
        f"{base['total']}); mean rank {mean(section['mean_rank_showcase'])} of {n_shown}, "
        f"{mean(section['mean_rank_all'])} of {section['of_all']}.</p>"
        "<p>That last token is not story text and its reading carries an offset shared by all "
        "scenarios, so the same ranks are also given relative to the mean scenario (each "
        "emotion's score minus its mean over all scenarios): the intended emotion is then "
        f"first in <b>{section['first_relative']}/{section['total']}</b> (words: "
        f"{base['first_relative']}/{base['total']}), and averaged per intended emotion "
        f"{section['by_emotion']['diagonal_first']}/{len(section['by_emotion']['rows'])} rows "
        "peak on the diagonal (right panel).</p>"
        + _image(figures.get("scenarios"), "scenario x emotion matrix")
        + _table(header, rows, 2)
    )


def _html_intensity(report: dict, figures: dict[str, Path]) -> str:
    section = report["intensity"]
    base = section["baseline"]["expect"]
    rows = []
    for template in section["templates"]:
        for emotion, check in template["expect"].items():
            words = base[template["id"]][emotion]
            rows.append([
                _esc(template["template"]), _esc(emotion), check["direction"],
                _num(check["rho"]), '<span class="ok">met</span>' if check["met"]
                else '<span class="no">not met</span>', _num(words["rho"]),
            ])  # fmt: skip
    missing = sorted({e for t in section["templates"] for e in t["missing"]})
    return (
        "<p>Each template is filled with values from benign to extreme and read like a "
        "scenario. An expectation is met when the Spearman rho of the emotion's score with "
        f"the value index has the expected sign and |rho| &ge; {section['threshold']}. Met: "
        f"<b>{section['met']}/{section['total']}</b> (words: {section['baseline']['met']}/"
        f"{section['baseline']['total']}). Curves show the change from the first (most "
        "benign) value; dashed lines are unexpected emotions for contrast.</p>"
        + (f'<p class="note">Not in the bank: {_esc(", ".join(missing))}.</p>' if missing else "")
        + _image(figures.get("intensity"), "intensity curves")
        + _table(["template", "emotion", "expected", "rho", "", "words rho"], rows, 2)
    )


def _html_steering(report: dict, figures: dict[str, Path]) -> str:
    result = report.get("steering")
    if not result:
        return '<p class="note">Not run (<code>--no-steering</code>, or no steering module).</p>'
    count = result["beats_random"]
    degrades = result["degrades_at"]
    return (
        f"<p>Adding each emotion's unit vector (x strength x mean residual norm "
        f"{result['norm']:.1f}) at layer {result['layer']} at every position, the emotion's "
        f"own word gains more log-probability than under every random direction of equal norm "
        f"for <b>{count['count']}/{count['of']}</b> emotions at strength {count['reference']:g}."
        f" Text degrades (perplexity over {result['degrade_factor']:g}x unsteered) at "
        + (f"{degrades:g}" if degrades is not None else "no tested strength")
        + f". Strengths: {result['strengths']}; probes: "
        + _esc("; ".join(result["probes"].values()))
        + ".</p>"
        + _image(figures.get("steering"), "steering dose-response")
    )
