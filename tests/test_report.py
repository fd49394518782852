"""Validation report: every section present and finite, typed results behind report.json,
self-contained HTML, PNG figures, and the section list that makes the report extensible."""

from __future__ import annotations

import dataclasses
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emolens import concepts
from emolens.bank import random_bank
from emolens.corpus import templates
from emolens.errors import EmolensError
from emolens.report import Report, SteeringSettings, headline_text, write_report
from emolens.report.sections import SECTIONS
from tests.conftest import tiny_llama

LAYERS = [1, 2]
# Where report.json may hold null for the tiny run: undefined by design (see emolens.report).
NULLABLE = {"degrades_at"}
SHORT_STEERING = SteeringSettings(
    strengths=(0.1, 0.4), n_random=2, generation_prompts=("Hello.",), max_new_tokens=4
)


def make_bank(lm, seed=0, emotions=None, layers=LAYERS):
    emotions = emotions or concepts.emotions()
    bank = random_bank(emotions, layers, lm.width, norm=3.0, seed=seed)
    bank.model = dict(lm.fingerprint)
    bank.default_layer = 2
    return bank


def write_heldout(bank, path, per_emotion=2, seed=0):
    """Held-out pooled activations that lie near their emotion's vector (so accuracy is high)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(bank.emotions)).repeat_interleave(per_emotion)
    pooled = torch.stack(
        [bank.center[i] + 3.0 * bank.matrix(layer)[labels] for i, layer in enumerate(bank.layers)],
        1,
    )
    pooled += 0.1 * torch.randn(pooled.shape, generator=generator)
    meta = {"emotions": json.dumps(bank.emotions), "layers": json.dumps(bank.layers)}
    save_file({"pooled": pooled.contiguous(), "labels": labels}, str(path), metadata=meta)


def write_halves(bank, path, stories=4, seed=1):
    """Two halves' emotion means near the bank's vectors, as the build writes them."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.stack([bank.center[i] + 3.0 * bank.matrix(layer) for i, layer in
                                      enumerate(bank.layers)]) for _ in range(2)])  # fmt: skip
    means += 0.01 * torch.randn(means.shape, generator=generator)
    counts = torch.full((2, len(bank.emotions)), stories / 2)
    meta = {"emotions": json.dumps(bank.emotions), "layers": json.dumps(bank.layers)}
    save_file({"means": means.contiguous(), "counts": counts}, str(path), metadata=meta)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """A full report of a random 171-emotion bank on the tiny model, steering included (the
    real steering evaluation, on a shorter dose range to keep the test fast)."""
    folder = tmp_path_factory.mktemp("bank")
    bank = make_bank(tiny)
    bank.save(folder / "bank.safetensors")
    write_heldout(bank, folder / "heldout.safetensors")
    write_halves(bank, folder / "halves.safetensors")
    norms = folder / "norms.csv"
    norms.write_text(
        "word,valence,arousal\nhappy,8.5,6\nsad,2,3.5\nafraid,2.5,7\ncalm,7,1.5\nangry,2.5,7.5\n"
        "proud,8,5.5\nunrelated,5,5\n"
    )
    out = folder / "report"
    long = tiny_llama(context=4096)  # the same weights, long enough for every neutral dialogue
    report = write_report(
        long, folder / "bank.safetensors", out, norms=norms, steering=SHORT_STEERING,
        progress=False,
    )  # fmt: skip
    return report, out


def walk(value, path=()):
    """(path, leaf) for every leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, (*path, i))
    else:
        yield path, value


def read_json(path):
    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_report_json_has_every_section_with_finite_numbers(built):
    report, out = built
    data = read_json(out / "report.json")
    assert data == report.to_json()
    for section in SECTIONS:
        if section.evaluate is not None:
            assert data[section.key], section.key
    leaves = list(walk(data))
    floats = [v for _, v in leaves if isinstance(v, float)]
    assert len(floats) > 1000 and all(math.isfinite(v) for v in floats)
    nulls = [p for p, v in leaves if v is None]
    assert all(any(key in NULLABLE for key in p if isinstance(key, str)) for p in nulls), nulls
    assert len(data["logit_lens"]["emotions"]) == 171
    assert len(data["scenarios"]["vectors"]["items"]) == 60
    assert len(data["scenarios"]["baseline"]["items"]) == 60
    assert data["steering"]["beats_random"]["of"] == 12
    assert data["steering"]["strengths"] == [0.0, 0.1, 0.4]  # the settings passed in
    assert data["headline"]["steering_of"] == 12
    assert set(data["step_seconds"]) >= {"word baseline", "steering", "figures"}


def test_report_is_frozen_and_typed(built):
    report, _ = built
    assert isinstance(report, Report)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.layer = 1
    assert report.steering.perplexity.unsteered >= 1.0
    assert report.accuracy.table.best_layer == report.accuracy.best_layer


def test_headline_compares_vectors_with_words(built):
    report, _ = built
    head = report.headline
    ours, words = head.vectors, head.baseline
    assert head.best_layer in LAYERS and head.layer == 2
    # Held-out texts lie on the bank's own vectors: near-perfect for them, near chance for words.
    assert ours.top1 > 0.9 and ours.top5 >= ours.top1 and ours.showcase_top1 > 0.9
    assert words.top1 < 0.2
    for side in (ours, words):
        assert 0 <= side.pc1_valence_r <= 1 and 0 <= side.pc2_arousal_r <= 1  # sign-aligned
    assert ours.scenarios_total == words.scenarios_total == 60
    assert 0 <= ours.scenarios_first <= 60 and 0 <= ours.scenarios_first_relative <= 60
    total = sum(len(t["expect"]) for t in templates())
    assert ours.intensity_total == words.intensity_total == total
    assert 0 <= ours.intensity_met <= total
    assert head.steering_of == 12 and head.steering_reference == 0.1
    text = headline_text(report)
    assert "vectors" in text and "words" in text and f"{ours.top1:.1%}" in text
    assert f"{head.steering_beats_random}/12 emotions" in text


def test_geometry_with_norms_counts_overlap(built):
    report, _ = built
    geometry = report.geometry
    assert geometry.vectors.norms.n == 6  # "unrelated" is not an emotion
    assert geometry.vectors.ratings.n == 171
    members = [m for c in geometry.vectors.clusters for m in c.members]
    assert sorted(members) == sorted(concepts.emotions())
    rsa = np.asarray(geometry.rsa.r)
    assert rsa.shape == (2, 2) and np.allclose(np.diag(rsa), 1.0)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset")]
        self.ids += [value for name, value in attrs if name == "id"]


def test_html_is_self_contained_and_figures_are_pngs(built):
    report, out = built
    page = (out / "report.html").read_text()
    parser = Links()
    parser.feed(page)
    assert parser.urls and all(u.startswith(("data:", "#")) for u in parser.urls), parser.urls
    assert not {"script", "link", "iframe"} & set(parser.tags)
    assert "url(" not in page and "@import" not in page
    images = [u for u in parser.urls if u.startswith("data:image/png;base64,")]
    assert len(images) == len(report.figures) == 9  # steering, transfer and axes included
    for name in report.figures.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.ids == [section.key for section in SECTIONS]
    anchors = {u[1:] for u in parser.urls if u.startswith("#")}
    assert anchors <= set(parser.ids)


def test_split_half_check_uses_the_training_stories(built):
    report, out = built
    split = report.axes.split_half
    assert split.stories == 4 * 171
    # both halves lie near the same vectors: the similarity structures agree
    assert split.similarity_r > 0.9 and len(split.component_cosine) == 3
    assert "Split-half check (684 stories)" in (out / "report.html").read_text()


def test_every_evaluated_section_is_a_report_field():
    fields = {f.name for f in dataclasses.fields(Report)}
    evaluated = [s.key for s in SECTIONS if s.evaluate is not None]
    assert set(evaluated) <= fields and len(set(evaluated)) == len(evaluated)
    facts = {"emolens", "created", "model", "bank", "layer", "variant", "seconds",
             "step_seconds", "figures"}  # fmt: skip
    assert fields - facts == set(evaluated)


def test_partial_bank_without_heldout_or_steering_still_complete(tiny, tmp_path):
    emotions = concepts.emotions()[:40]  # a partial bank, in memory: no held-out file anywhere
    bank = make_bank(tiny, seed=1, emotions=emotions, layers=[2])  # and of one layer
    report = write_report(tiny, bank, tmp_path, steering=None, transfer=False, progress=False)
    shown = [e for e in concepts.showcase() if e in emotions]
    assert report.scenarios.vectors.showcase == shown
    assert report.scenarios.vectors.total == 5 * len(shown)
    assert len(report.logit_lens.emotions) == 40
    assert report.accuracy.table is None and report.headline.vectors.top1 is None
    assert report.steering is None and "accuracy" not in report.figures
    assert "steering" not in report.figures
    assert "n/a" in headline_text(report) and "steering" not in headline_text(report)
    data = read_json(tmp_path / "report.json")
    assert data["steering"] is None and data["headline"]["steering_of"] is None
    assert data["transfer"] is None and len(data["axes"]["components"]) == 10
    assert data["accuracy"]["table"] is None and data["geometry"]["vectors"]["norms"] is None
    assert data["geometry"]["rsa"] == {"layers": [2], "r": [[1.0]]}
    parser = Links()
    parser.feed((tmp_path / "report.html").read_text())
    assert all(u.startswith(("data:", "#")) for u in parser.urls)


def test_explicit_heldout_must_match_the_bank(tiny, tmp_path):
    bank = make_bank(tiny)
    other = random_bank(concepts.emotions()[:20], LAYERS, tiny.width)
    write_heldout(other, tmp_path / "heldout.safetensors")
    with pytest.raises(EmolensError, match="emotions"):
        write_report(tiny, bank, tmp_path, heldout=tmp_path / "heldout.safetensors")
    with pytest.raises(EmolensError, match="no such held-out file"):
        write_report(tiny, bank, tmp_path, heldout=tmp_path / "missing.safetensors")


def test_bank_of_another_model_is_refused(tiny, tmp_path):
    bank = make_bank(tiny_llama(seed=3))
    with pytest.raises(EmolensError, match="weights"):
        write_report(tiny, bank, tmp_path, progress=False)


def test_cli_parses_report_options():
    from emolens.cli import build_parser

    args = build_parser().parse_args(
        ["report", "--bank", "b.safetensors", "--norms", "n.csv", "--no-steering", "--layer", "3"]
    )
    assert args.bank == "b.safetensors" and args.no_steering and args.layer == 3
    assert args.out is None and callable(args.run)


@pytest.mark.slow
def test_embedded_report_of_a_real_bank(embedded, embedded_bank, tmp_path):
    """The whole report on the embedded model and a real 12-emotion bank, in memory (so its
    held-out table comes from the bank's build metadata)."""
    report = write_report(
        embedded, embedded_bank, tmp_path, steering=SHORT_STEERING, progress=False
    )
    transfer = report.transfer
    assert transfer is not None and transfer.texts == 12 * 40
    chosen = transfer.second_half[transfer.chosen]
    assert sum(s.top1 for s in chosen.values()) / 4 > transfer.chance["top1"]
    assert report.accuracy.table is not None and report.accuracy.baseline is None
    assert "metadata" in report.accuracy.source
    assert report.headline.vectors.top1 > report.accuracy.chance.top1
    assert report.scenarios.vectors.total == 60 and report.steering.beats_random.of == 12
    assert report.logit_lens.norm == "model.norm"
    data = read_json(tmp_path / "report.json")
    assert data == report.to_json() and len(report.figures) == 9
    print(headline_text(report))
