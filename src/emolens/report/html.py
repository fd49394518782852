"""The report as one self-contained HTML page: inline CSS, figures as data URIs, no scripts and
no external requests. Each section's renderer takes the Report and the figure files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from emolens import concepts
from emolens.evaluate.geometry import Geometry, RatingFit
from emolens.pages import document
from emolens.pages import esc as _esc
from emolens.pages import image as _image
from emolens.pages import table as _table
from emolens.report.results import Report
from emolens.report.text import headline_text, pct, signed


def page(report: Report, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page from the rendered sections, (anchor, title, HTML body) in order."""
    numbered = [(key, f"{n}. {title}", body) for n, (key, title, body) in enumerate(sections, 1)]
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title, _ in numbered)
    body = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{content}</section>'
        for key, title, content in numbered
    )
    model, bank = report.model, report.bank
    return document(
        f"emolens report: {model.get('name')}",
        f"<h1>emolens validation report: {_esc(model.get('name'))}</h1>"
        f'<p class="note">{_esc(model.get("architecture"))}, {model.get("depth")} layers, width '
        f"{model.get('width')}, weights {_esc(model.get('weights'))}; bank of "
        f"{bank.emotions} emotions at layers {bank.layers}; analysis layer {report.layer} "
        f"({report.variant} vectors). emolens {_esc(report.emolens)}, {_esc(report.created)}, "
        f"{report.seconds} s.</p>"
        f"<h2>Headline</h2><pre>{_esc(headline_text(report))}</pre><nav>{nav}</nav>{body}",
    )


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
    return [[pc, str(fit.n), signed(r.valence), signed(r.arousal)] for pc, r in fit.r.items()]


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


def transfer(report: Report, images: dict[str, Path]) -> str:
    result = report.transfer
    if result is None:
        return '<p class="note">Not run (<code>--no-transfer</code>, or no cross-genre text for the bank\'s emotions).</p>'
    from emolens.corpus import GENRES

    chosen = result.chosen
    ranked = sorted(
        result.first_half, key=lambda name: -(_genre_mean(result.first_half[name]) or 0.0)
    )
    rows = []
    for name in ranked[:12] + ([chosen] if chosen not in ranked[:12] else []):
        second = result.second_half[name]
        mark = " (chosen)" if name == chosen else ""
        rows.append([f"{_esc(name)}{mark}", pct(_genre_mean(result.first_half[name]))]
                    + [pct(second[g].top1) for g in GENRES] + [pct(_genre_mean(second))])  # fmt: skip
    words = result.words.get(chosen.replace(chosen.split("/")[2], "words"))
    if words:
        rows.append(["word baseline (same reading)", ""] + [pct(words[g].top1) for g in GENRES]
                    + [pct(_genre_mean(words))])  # fmt: skip
    second = result.second_half[chosen]
    detail = [[_esc(g), second[g].n, pct(second[g].top1), pct(second[g].top1_showcase),
               pct(second[g].top5_all)] for g in GENRES]  # fmt: skip
    chance = result.chance
    return (
        f"<p>{result.texts} validation texts in four genres (never used to build vectors), "
        f"{len(result.emotions)} emotions, read at layer {result.layer}. A choice is "
        "<i>rendering/pooling/variant/baseline</i>: the text as plain text or as a user turn; "
        "pooled over its own tokens by the mean, the last token, the maximum of a 5-token "
        "moving average, or read at the reply start; the bank's variants; calibrated by nothing "
        "(none), by the neutral baseline (each emotion's mean reading on neutral dialogues, "
        "read the same way, subtracted) or by the bank's centre (the mean training story, "
        "projected and subtracted, as for held-out stories). Choices are ranked on one half of the texts and scored on the "
        f"other. Top-1 among the {len(result.emotions)} (chance {pct(chance['top1'])}):</p>"
        + _table(["choice", "first half (mean)", *GENRES, "second half (mean)"], rows)
        + f"<p>The chosen reading <code>{_esc(chosen)}</code> on the second half: top-1 among "
        f"the {len(result.emotions)}, top-1 of showcase texts among the 12 (chance "
        f"{pct(chance['top1_showcase'])}), top-5 among all (chance {pct(chance['top5_all'])}).</p>"
        + _table(["genre", "texts", "top-1", "showcase top-1", "top-5 of all"], detail)
        + _image(images.get("transfer"), "cross-genre accuracy")
    )


def _genre_mean(rows: dict) -> float | None:
    values = [s.top1 for s in rows.values() if s.top1 is not None]
    return sum(values) / len(values) if values else None


def axes(report: Report, images: dict[str, Path]) -> str:
    result = report.axes
    rows = [[f"PC{c.index}", pct(c.variance), signed(c.valence_r), signed(c.arousal_r),
             signed(c.norms_valence_r), signed(c.norms_arousal_r), _esc(", ".join(c.low)),
             _esc(", ".join(c.high))] for c in result.components]  # fmt: skip
    split = result.split_half
    halves = (
        f"<p>Split-half check ({split.stories} stories): the top three components estimated "
        "from two disjoint halves of the training stories (centred emotion means, before "
        "denoising) have |cos| "
        + ", ".join(f"{v:.2f}" for v in split.component_cosine)
        + f"; PC1 scores agree at r = {signed(split.pc1_scores_r)} and the similarity "
        f"structures at r = {signed(split.similarity_r)}.</p>"
        if split
        else '<p class="note">No per-story activations beside the bank: no split-half check.</p>'
    )
    return (
        f"<p>The top {len(result.components)} principal components of the {report.variant} unit "
        f"vectors at layer {report.layer}: variance explained, r with the shipped valence and "
        "arousal ratings (and with <code>--norms</code> if given), and the five emotions at "
        "each end. A leave-one-out linear fit of the ratings from all of these components "
        f"(over {result.rated} rated emotions) reaches r = {signed(result.fit_valence_r)} for "
        f"valence and r = {signed(result.fit_arousal_r)} for arousal: valence can be "
        "represented even where no single component carries it.</p>"
        + _table(
            [
                "PC",
                "variance",
                "r valence",
                "r arousal",
                "norms r valence",
                "norms r arousal",
                "low end",
                "high end",
            ],
            rows,
        )  # fmt: skip
        + halves
        + _image(images.get("axes"), "principal axes")
    )
