"""The report's sections, in page order: each one's evaluator (Inputs -> typed result, stored
in the Report field named by its key), its HTML renderer and its figures.

Adding a section ("transfer", say):
1. in `emolens.evaluate`, a function without I/O that returns a frozen dataclass with
   `to_json` (None, never NaN, for an undefined value);
2. a field `transfer: TransferResult | None` on `Report` (results.py);
3. here, a function `transfer(inputs) -> TransferResult` that feeds it from `Inputs`, and
   one `Section("transfer", "Cross-genre accuracy", html.transfer, transfer,
   figures.transfer)` in SECTIONS, with the renderer in html.py and, if it has figures,
   the drawer in figures.py. Its place in SECTIONS is its place on the page.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from emolens import concepts
from emolens.bank import EmotionBank
from emolens.corpus import load as load_corpus
from emolens.evaluate.axes import Axes, evaluate_axes
from emolens.evaluate.geometry import BankGeometry, bank_geometry
from emolens.evaluate.heldout import HeldoutTable, heldout_accuracy
from emolens.evaluate.intensity import Intensity, score_templates
from emolens.evaluate.logit_lens import LogitLens, logit_lens
from emolens.evaluate.scenarios import Scenarios, project, score_scenarios
from emolens.evaluate.steering import SteeringResult, evaluate_steering
from emolens.evaluate.transfer import Transfer, evaluate_transfer
from emolens.report import figures, html
from emolens.report.inputs import Inputs
from emolens.report.results import AccuracySection, Chance, Compared, Report

KMEANS_K, KMEANS_SEED = 10, 0
NEUTRAL_REFERENCE = 100  # neutral dialogues behind the cross-genre neutral baseline
RATINGS_SOURCE = "shipped judge ratings (valence, arousal 1-7) of the 171 emotions"


@dataclass(frozen=True)
class Section:
    """One part of the report. `key` names its Report field (and its page anchor); `evaluate`
    computes that field (None for a section that only shows other sections' results);
    `render` gives its HTML from the report and the figure files; `draw` writes its figures
    from its result into a folder ({name: path}; not called when the result is None)."""

    key: str
    title: str
    render: Callable[[Report, dict[str, Path]], str]
    evaluate: Callable[[Inputs], Any] | None = None
    draw: Callable[[Any, Path], dict[str, Path]] | None = None


def accuracy(inputs: Inputs) -> AccuracySection:
    """Per-layer held-out accuracy of the bank (raw, denoised) and of the word baseline."""
    bank, path, source = inputs.bank, inputs.heldout, inputs.heldout_note
    table: HeldoutTable | None
    baseline: HeldoutTable | None
    if path is not None:
        table, baseline = heldout_accuracy(bank, path), heldout_accuracy(inputs.baseline, path)
    else:
        stored = bank.meta.get("heldout")
        table, baseline = (HeldoutTable.from_json(stored) if stored else None), None
        if stored:
            source = "from the bank's build metadata (no held-out file: no baseline accuracy)"
    shown = sum(e in bank.emotions for e in concepts.showcase())
    n = len(bank.emotions)
    return AccuracySection(
        source=source,
        table=table,
        baseline=baseline,
        best_layer=table.best_layer if table else None,
        showcase=shown,
        chance=Chance(top1=1 / n, top5=min(1.0, 5 / n), showcase_top1=1 / shown if shown else None),
    )


def geometry(inputs: Inputs) -> BankGeometry:
    """Geometry of the vectors and of the word baseline at the analysis layer, and RSA."""
    bank, index = inputs.bank, inputs.bank.layer_index(inputs.layer)
    return bank_geometry(
        bank.vectors[inputs.variant].double().numpy(),
        inputs.baseline.vectors[inputs.variant][index].double().numpy(),
        bank.layers,
        inputs.layer,
        bank.emotions,
        concepts.ratings(),
        ratings_source=RATINGS_SOURCE,
        norms=inputs.norms,
        norms_source=inputs.norms_path,
        k=KMEANS_K,
        seed=KMEANS_SEED,
    )


def lens(inputs: Inputs) -> LogitLens:
    """The tokens each vector promotes and suppresses at the analysis layer."""
    return logit_lens(
        inputs.lm, inputs.bank.matrix(inputs.layer, inputs.variant), inputs.bank.emotions
    )


def scenarios(inputs: Inputs) -> Compared[Scenarios]:
    """Scenario readings of the bank's vectors and of the word baseline."""
    messages, emotions = inputs.messages, inputs.bank.emotions
    return _both(
        inputs,
        messages.scenario_states,
        lambda scores: score_scenarios(messages.scenarios, scores, emotions, concepts.showcase()),
    )


def intensity(inputs: Inputs) -> Compared[Intensity]:
    """Intensity-template readings of the bank's vectors and of the word baseline."""
    messages, emotions = inputs.messages, inputs.bank.emotions
    return _both(
        inputs,
        messages.template_states,
        lambda scores: score_templates(messages.templates, scores, emotions),
    )


def _both(inputs: Inputs, states: torch.Tensor, evaluate: Callable[[np.ndarray], Any]) -> Compared:
    """`evaluate` of the states' scores on the bank's vectors and on the word baseline's."""
    scored = [
        evaluate(project(states, source, inputs.layer, inputs.variant))
        for source in (inputs.bank, inputs.baseline)
    ]
    return Compared(*scored)


def steering(inputs: Inputs) -> SteeringResult | None:
    """The steering evaluation, or None when skipped or the bank has no showcase emotion."""
    if inputs.steering is None or not set(concepts.showcase()) & set(inputs.bank.emotions):
        return None
    return evaluate_steering(
        inputs.lm, inputs.bank, inputs.steering, layer=inputs.layer, variant=inputs.variant
    )


def axes(inputs: Inputs) -> Axes:
    """What the top principal components of the vectors encode, at the analysis layer, with
    the split-half check where the build's halves.safetensors lies beside its held-out set."""
    index = inputs.bank.layer_index(inputs.layer)
    vectors = inputs.bank.vectors[inputs.variant][index].double().numpy()
    path = inputs.heldout.parent / "halves.safetensors" if inputs.heldout else None
    halves = story_halves(path, inputs.bank, inputs.layer) if path and path.is_file() else None
    return evaluate_axes(vectors, inputs.bank.emotions, concepts.ratings(), norms=inputs.norms,
                         halves=halves[:2] if halves else None,
                         stories=halves[2] if halves else 0)  # fmt: skip


def story_halves(
    path: Path, bank: EmotionBank, layer: int
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Centred emotion means [emotions, width] at `layer` from the two halves of the training
    stories written by the build, and the number of stories; None when the file is for other
    emotions or layers, or an emotion has no story in a half."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if (
        json.loads(meta.get("emotions", "[]")) != bank.emotions
        or json.loads(meta.get("layers", "[]")) != bank.layers
    ):
        return None
    data = load_file(str(path))
    if bool((data["counts"] == 0).any()):
        return None
    means = data["means"][:, bank.layer_index(layer)].double()  # [2, emotions, width]
    centred = means - means.mean(1, keepdim=True)
    return centred[0].numpy(), centred[1].numpy(), int(data["counts"].sum())


def transfer(inputs: Inputs) -> Transfer | None:
    """Every readout choice on the cross-genre validation texts (None when skipped, or when
    the bank has none of their emotions)."""
    if not inputs.transfer:
        return None
    corpus = load_corpus()
    records = [r for r in corpus.genres("validation") if r.emotion in inputs.bank.emotions]
    if not records:
        return None
    neutral = [r.text for r in corpus.neutral()[:NEUTRAL_REFERENCE]]
    return evaluate_transfer(inputs.lm, inputs.bank, records, neutral, layer=inputs.layer,
                             words=inputs.baseline)  # fmt: skip


SECTIONS = (
    Section("accuracy", "Held-out accuracy per layer", html.accuracy, accuracy, figures.accuracy),
    Section("geometry", "Geometry", html.geometry, geometry, figures.geometry),
    Section("baseline", "Word-embedding baseline", html.baseline),
    Section("logit_lens", "Logit lens", html.logit_lens, lens),
    Section("scenarios", "Implicit scenarios", html.scenarios, scenarios, figures.scenarios),
    Section("intensity", "Intensity templates", html.intensity, intensity, figures.intensity),
    Section("steering", "Steering", html.steering, steering, figures.steering),
    Section("transfer", "Cross-genre transfer", html.transfer, transfer, figures.transfer),
    Section("axes", "What the main axes encode", html.axes, axes, figures.axes),
)
