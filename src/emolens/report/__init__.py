"""Validation report (METHOD.md 4-5): every number in report.json, PNG figures and one
self-contained HTML page, from typed section results.

Sections, in page order: held-out accuracy per layer, geometry (similarity, PCA against
valence/arousal ratings, k-means, similarity across layers), the word-embedding baseline,
logit lens, implicit scenarios, intensity templates and steering. Modules: `run` (write_report),
`inputs` (what evaluators read), `sections` (the section list: evaluator, renderer, figures),
`results` (Report and the section result types), `figures`, `html`, `text` (headline).
In report.json a null marks a value that is undefined (a correlation of a constant or over
fewer than three words, an accuracy with no showcase story held out, a section not run).
"""

from __future__ import annotations

from emolens.evaluate.steering import SteeringSettings
from emolens.report.results import Report
from emolens.report.run import write_report
from emolens.report.text import headline_text

__all__ = ["Report", "SteeringSettings", "headline_text", "write_report"]
