"""The report as one self-contained HTML page: inline CSS, figures as data URIs, no scripts and
no external requests. Each section's renderer takes the Report and the figure files."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emolens import concepts
from emolens.evaluate.geometry import Geometry, RatingFit
from emolens.report.results import Report
from emolens.report.text import headline_text, pct, signed

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


def page(report: Report, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page from the rendered sections, (anchor, title, HTML body) in order."""
    numbered = [(key, f"{n}. {title}", body) for n, (key, title, body) in enumerate(sections, 1)]
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title, _ in numbered)
    body = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{content}</section>'
        for key, title, content in numbered
    )
    model, bank = report.model, report.bank
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>emolens report: {_esc(model.get('name'))}</title><style>{CSS}</style></head>"
        f"<body><h1>emolens validation report: {_esc(model.get('name'))}</h1>"
        f'<p class="note">{_esc(model.get("architecture"))}, {model.get("depth")} layers, width '
        f"{model.get('width')}, weights {_esc(model.get('weights'))}; bank of "
        f"{bank.emotions} emotions at layers {bank.layers}; analysis layer {report.layer} "
        f"({report.variant} vectors). emolens {_esc(report.emolens)}, {_esc(report.created)}, "
        f"{report.seconds} s.</p>"
        f"<h2>Headline</h2><pre>{_esc(headline_text(report))}</pre><nav>{nav}</nav>{body}"
        "</body></html>"
    )


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


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _rank(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _variance(part: Geometry, n: int) -> str:
    return ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(part.variance_explained[:n]))


def accuracy(report: Report, images: dict[str, Path]) -> str:
    section = report.accuracy
    table, base = section.table, section.baseline
    if table is None:
        return f'<p class="note">No held-out data: {_esc(section.source)}.</p>'
    keys = ("top1", "top5", "showcase_top1")
    rows = []
    for layer, row in table.layers.items():
        words = base.layers[layer][report.variant] if base else None
        mark = " (best)" if layer == section.best_layer else ""
        rows.append(
            [f"{layer}{mark}"]
            + [pct(getattr(row[v], key)) for key in keys for v in ("raw", "denoised")]
            + [pct(getattr(words, key) if words else None) for key in keys]
        )
    header = ["layer", "top-1 raw", "top-1 denoised", "top-5 raw", "top-5 denoised",
              "showcase raw", "showcase denoised", "words top-1", "words top-5",
              "words showcase"]  # fmt: skip
    chance = section.chance
    return (
        f"<p>{table.n} held-out stories ({report.bank.emotions}-way "
        f"classification: the centred pooled activation projected on every unit vector), "
        f"{table.n_showcase} of them for the {section.showcase} showcase emotions in the "
        "bank (the showcase columns classify these among the showcase emotions only). Chance: "
        f"top-1 {pct(chance.top1)}, top-5 {pct(chance.top5)}, showcase "
        f"{pct(chance.showcase_top1)}. The word baseline is scored the same way "
        '(see <a href="#baseline">the word-embedding baseline</a>). '
        f'<span class="note">Source: {_esc(section.source)}.</span></p>'
        + _table(header, rows)
        + _image(images.get("accuracy"), "held-out accuracy per layer")
    )


def _ratings_rows(fit: RatingFit | None) -> list[list[str]]:
    if fit is None:
        return []
    return [[pc, fit.n, signed(r.valence), signed(r.arousal)] for pc, r in fit.r.items()]


def _clusters(part: Geometry) -> str:
    rows = [[_esc(c.label), c.size, _esc(", ".join(c.members))] for c in part.clusters]
    return _table(["cluster (nearest the centroid)", "size", "members (closest first)"], rows, 3)


def geometry(report: Report, images: dict[str, Path]) -> str:
    section = report.geometry
    part = section.vectors
    flips = ", ".join(pc for pc, flipped in part.flipped.items() if flipped) or "none"
    norm_rows = _ratings_rows(part.norms)
    norms = (
        f"<p>Against the human norms in <code>{_esc(section.norms_source)}</code> "
        f"(overlapping words only, same PC orientation):</p>"
        + _table(["PC", "n", "r valence", "r arousal"], norm_rows)
        if norm_rows
        else '<p class="note">No human norms given (use <code>--norms CSV</code>).</p>'
    )
    return (
        f"<p>Layer {report.layer}, {part.n} {report.variant} vectors. Cosine similarity, "
        "ordered by average-linkage hierarchical clustering:</p>"
        + _image(images.get("similarity"), "cosine similarity heatmap")
        + f"<p>PCA of the unit vectors: variance explained {_variance(part, 5)}. Principal "
        "components have no intrinsic sign: PC1 and PC3 are oriented so that their r with "
        "valence is positive, PC2 so that its r with arousal is positive (flipped here: "
        f"{flips}). Correlations with the {_esc(section.ratings_source)}:</p>"
        + _table(["PC", "n", "r valence", "r arousal"], _ratings_rows(part.ratings))
        + norms
        + _image(images.get("pca"), "PC1/PC2 scatter")
        + f"<p>k-means (k = {section.k}, seed {section.seed}, "
        "k-means++ start, on unit vectors; empty clusters dropped):</p>"
        + _clusters(part)
        + "<p>Similarity structure across layers: Pearson r between the upper triangles of the "
        f"cosine-similarity matrices of every pair of bank layers {section.rsa.layers}.</p>"
        + _image(images.get("rsa"), "similarity structure across layers")
    )


def baseline(report: Report, images: dict[str, Path]) -> str:
    section = report.geometry
    ours, words = report.headline.vectors, report.headline.baseline

    def count(first: int, total: int) -> str:
        return f"{first}/{total}"

    rows = [
        ["held-out top-1 (best layer)", pct(ours.top1), pct(words.top1)],
        ["held-out top-5 (best layer)", pct(ours.top5), pct(words.top5)],
        ["held-out top-1, showcase only", pct(ours.showcase_top1), pct(words.showcase_top1)],
        ["PC1 ~ valence r", signed(ours.pc1_valence_r), signed(words.pc1_valence_r)],
        ["PC2 ~ arousal r", signed(ours.pc2_arousal_r), signed(words.pc2_arousal_r)],
        [f"scenarios: intended first of {len(report.scenarios.vectors.showcase)}",
         count(ours.scenarios_first, ours.scenarios_total),
         count(words.scenarios_first, words.scenarios_total)],
        ["intensity expectations met", count(ours.intensity_met, ours.intensity_total),
         count(words.intensity_met, words.intensity_total)],
    ]  # fmt: skip
    return (
        "<p>Word embeddings alone show some emotion structure, so every check is repeated "
        "with vectors built from the words: the mean input embedding of the tokens of "
        '" word", centred over the emotions. They are scored exactly like the bank (same '
        "centre, same layers); only the directions differ.</p>"
        + _table(["", "vectors", "words"], rows)
        + "<p>Similarity structure shared with the words (r of the cosine matrices' upper "
        f"triangles at layer {report.layer}): {signed(section.baseline_similarity_r)}. "
        f"Baseline PCA variance explained: {_variance(section.baseline, 3)}.</p>"
        + _table(["PC", "n", "r valence", "r arousal"], _ratings_rows(section.baseline.ratings))
        + "<p>k-means of the word vectors:</p>"
        + _clusters(section.baseline)
    )


def logit_lens(report: Report, images: dict[str, Path]) -> str:
    lens = report.logit_lens
    shown = [e for e in concepts.showcase() if e in lens.emotions]

    def tokens(pairs: list[tuple[str, float]]) -> str:
        return " ".join(f"<code>{_esc(repr(text))}</code>" for text, _ in pairs)

    rows = [[_esc(e), tokens(lens.emotions[e].top), tokens(lens.emotions[e].bottom)]
            for e in shown]  # fmt: skip
    return (
        f"<p>Top and bottom {lens.k} tokens of each {report.variant} vector at layer "
        f"{report.layer}: {_esc(lens.note)}. Showcase emotions here; all emotions, with "
        "logits, in report.json.</p>" + _table(["emotion", "promoted", "suppressed"], rows, 3)
    )


def scenarios(report: Report, images: dict[str, Path]) -> str:
    result, base = report.scenarios.vectors, report.scenarios.baseline
    n_shown = len(result.showcase)

    def mean(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    rows = [
        [_esc(item.id), _esc(item.emotion), _rank(item.rank_showcase),
         _rank(item.rank_relative), _rank(item.rank_all), _rank(words.rank_showcase),
         _esc(", ".join(item.top)), f'<span class="note">{_esc(item.text)}</span>']
        for item, words in zip(result.items, base.items, strict=True)
    ]  # fmt: skip
    header = ["scenario", "intended", f"rank of {n_shown}", f"relative rank of {n_shown}",
              f"rank of {result.of_all}", f"words: rank of {n_shown}", "top 3 (all)",
              "text"]  # fmt: skip
    by = result.by_emotion
    return (
        f"<p>Each scenario is one user message; the residual at layer {report.layer} is read "
        "at the last token before the Assistant's reply (the end of the assistant header, or "
        'the ":" of "Assistant:") and projected on the centred unit vectors. The intended '
        f"emotion ranks first among the {n_shown} showcase emotions in "
        f"<b>{result.first}/{result.total}</b> scenarios (words: {base.first}/"
        f"{base.total}); mean rank {mean(result.mean_rank_showcase)} of {n_shown}, "
        f"{mean(result.mean_rank_all)} of {result.of_all}.</p>"
        "<p>That last token is not story text and its reading carries an offset shared by all "
        "scenarios, so the same ranks are also given relative to the mean scenario (each "
        "emotion's score minus its mean over all scenarios): the intended emotion is then "
        f"first in <b>{result.first_relative}/{result.total}</b> (words: "
        f"{base.first_relative}/{base.total}), and averaged per intended emotion "
        f"{by.diagonal_first}/{len(by.rows)} rows peak on the diagonal (right panel).</p>"
        + _image(images.get("scenarios"), "scenario x emotion matrix")
        + _table(header, rows, 2)
    )


def intensity(report: Report, images: dict[str, Path]) -> str:
    result, base = report.intensity.vectors, report.intensity.baseline
    rows = []
    for template, words in zip(result.templates, base.templates, strict=True):
        for emotion, check in template.expect.items():
            rows.append([
                _esc(template.template), _esc(emotion), check.direction, signed(check.rho),
                '<span class="ok">met</span>' if check.met else '<span class="no">not met</span>',
                signed(words.expect[emotion].rho),
            ])  # fmt: skip
    missing = sorted({e for t in result.templates for e in t.missing})
    return (
        "<p>Each template is filled with values from benign to extreme and read like a "
        "scenario. An expectation is met when the Spearman rho of the emotion's score with "
        f"the value index has the expected sign and |rho| &ge; {result.threshold}. Met: "
        f"<b>{result.met}/{result.total}</b> (words: {base.met}/{base.total}). Curves show "
        "the change from the first (most benign) value; dashed lines are unexpected emotions "
        "for contrast.</p>"
        + (f'<p class="note">Not in the bank: {_esc(", ".join(missing))}.</p>' if missing else "")
        + _image(images.get("intensity"), "intensity curves")
        + _table(["template", "emotion", "expected", "rho", "", "words rho"], rows, 2)
    )


def steering(report: Report, images: dict[str, Path]) -> str:
    result = report.steering
    if result is None:
        return (
            '<p class="note">Not run (<code>--no-steering</code>, or no showcase emotion in '
            "the bank).</p>"
        )
    degrades = result.degrades_at
    return (
        f"<p>Adding each emotion's unit vector (x strength x mean residual norm "
        f"{result.norm:.1f}) at layer {result.layer} at every position, the emotion's "
        f"own word gains more log-probability than under every random direction of equal norm "
        f"for <b>{result.beats_random_at_reference}/{result.beats_random.of}</b> emotions at "
        f"strength {result.reference:g}. Text degrades (perplexity over "
        f"{result.degrade_factor:g}x unsteered) at "
        + (f"{degrades:g}" if degrades is not None else "no tested strength")
        + f". Strengths: {result.strengths}; probes: "
        + _esc("; ".join(result.probes.values()))
        + ".</p>"
        + _image(images.get("steering"), "steering dose-response")
    )
