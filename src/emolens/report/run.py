"""Write a validation report: evaluate every section (a line and a time per step), draw the
figures, then write report.json, the PNGs and report.html atomically into one folder."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emolens import __version__, concepts
from emolens.atomic import write_text
from emolens.bank import EmotionBank
from emolens.evaluate.baseline import baseline_bank
from emolens.evaluate.steering import DEFAULT_SETTINGS, SteeringSettings
from emolens.models import LoadedModel
from emolens.readout import resolve_layer
from emolens.report import html
from emolens.report.inputs import Inputs, find_heldout
from emolens.report.results import BankInfo, Report
from emolens.report.sections import SECTIONS

VARIANT = "denoised"
log = logging.getLogger("emolens")


def write_report(
    lm: LoadedModel,
    bank: EmotionBank | str | os.PathLike,
    out: str | os.PathLike,
    *,
    heldout: str | os.PathLike | None = None,
    norms: str | os.PathLike | None = None,
    steering: SteeringSettings | None = DEFAULT_SETTINGS,
    transfer: bool = True,
    progress: bool = True,
    layer: int | None = None,
) -> Report:
    """Evaluate `bank` (an EmotionBank or a bank file) on `lm`; write report.json, the PNG
    figures and report.html into `out`; return the Report.

    `heldout` is the build's heldout.safetensors (default: beside the bank file, or in the
    model's default build folder, if it matches the bank). `norms` is a CSV of human ratings
    (word, valence, arousal). `steering` sets the steering evaluation (None skips it);
    `transfer` False skips the cross-genre readings.
    `layer` is the analysis layer (default: the bank's).
    """
    started = time.perf_counter()
    bank, bank_path = _load_bank(bank)
    layer = resolve_layer(lm, bank, layer)
    heldout_path, heldout_note = find_heldout(lm, bank, bank_path, heldout)
    human = concepts.ratings(norms) if norms is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = Steps(progress)
    with step("word baseline"):
        words = baseline_bank(lm, bank)
    inputs = Inputs(lm, bank, words, layer, VARIANT, heldout_path, heldout_note, human,
                    str(norms) if norms is not None else None, steering, transfer)  # fmt: skip
    results: dict[str, Any] = {}
    for section in SECTIONS:
        if section.evaluate is not None:
            with step(section.title.lower()):
                results[section.key] = section.evaluate(inputs)
    report = Report(
        emolens=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=dict(lm.fingerprint),
        bank=BankInfo(
            path=str(bank_path) if bank_path else None,
            emotions=len(bank.emotions),
            layers=list(bank.layers),
            default_layer=bank.default_layer,
            kind=bank.kind,
        ),
        layer=layer,
        variant=VARIANT,
        **results,
    )
    images: dict[str, Path] = {}
    with step("figures"):
        for section in SECTIONS:
            result = results.get(section.key)
            if section.draw is not None and result is not None:
                images.update(section.draw(result, out))
    report = replace(
        report,
        seconds=round(time.perf_counter() - started, 1),
        step_seconds=step.seconds,
        figures={name: path.name for name, path in images.items()},
    )
    write_text(out / "report.json", json.dumps(report.to_json(), indent=1, allow_nan=False))
    parts = [(s.key, s.title, s.render(report, images)) for s in SECTIONS]
    write_text(out / "report.html", html.page(report, parts))
    if progress:
        log.info("report: wrote %s in %s s", out / "report.html", report.seconds)
    return report


def _load_bank(bank: EmotionBank | str | os.PathLike) -> tuple[EmotionBank, Path | None]:
    if isinstance(bank, EmotionBank):
        return bank, None
    return EmotionBank.load(bank), Path(bank)


class Steps:
    """A status line per report step (the "emolens" logger), with its time; `seconds` keeps
    every step's time."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            log.info("report: %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.enabled:
            log.info("report: %s done (%.1f s)", name, self.seconds[name])
