"""Validation report: every section present and finite, self-contained HTML, PNG figures,
and the maths of each evaluation on inputs whose answer is known."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emolens import concepts
from emolens.bank import random_bank
from emolens.errors import EmolensError
from emolens.evaluate import geometry as geo
from emolens.evaluate.baseline import baseline_bank, word_vectors
from emolens.evaluate.intensity import met, score_templates, spearman
from emolens.evaluate.logit_lens import final_norm, logit_lens
from emolens.evaluate.scenarios import last_token_states, rank, score_scenarios
from emolens.report import clean, headline_text, write_report
from tests.conftest import byte_tokenizer, tiny_llama


def prompt_ids(lm, text):
    return lm.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)


LAYERS = [1, 2]
SECTIONS = ("accuracy", "geometry", "logit_lens", "scenarios", "intensity", "steering")
# Where report.json may hold null for the tiny run: undefined by design (see report.py).
NULLABLE = {"degrades_at"}


def make_bank(lm, seed=0, emotions=None):
    emotions = emotions or concepts.emotions()
    bank = random_bank(emotions, LAYERS, lm.width, norm=3.0, seed=seed)
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


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """A full report of a random 171-emotion bank on the tiny model, steering included (the
    real steering evaluation, on a shorter dose range to keep the test fast)."""
    from emolens.evaluate import steering

    real = steering.evaluate_steering

    def short(lm, bank, **options):
        return real(lm, bank, **options, strengths=(0.1, 0.4), n_random=2,
                    generation_prompts=("Hello.",), max_new_tokens=4)  # fmt: skip

    folder = tmp_path_factory.mktemp("bank")
    bank = make_bank(tiny)
    bank.save(folder / "bank.safetensors")
    write_heldout(bank, folder / "heldout.safetensors")
    norms = folder / "norms.csv"
    norms.write_text(
        "word,valence,arousal\nhappy,8.5,6\nsad,2,3.5\nafraid,2.5,7\ncalm,7,1.5\nangry,2.5,7.5\n"
        "proud,8,5.5\nunrelated,5,5\n"
    )
    out = folder / "report"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steering, "evaluate_steering", short)
        report = write_report(
            tiny, folder / "bank.safetensors", out, norms=norms, steering=True, progress=False
        )
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


def test_report_json_has_every_section_with_finite_numbers(built):
    report, out = built
    text = (out / "report.json").read_text()

    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert data == report
    for section in SECTIONS:
        assert data[section], section
    leaves = list(walk(data))
    floats = [v for _, v in leaves if isinstance(v, float)]
    assert len(floats) > 1000 and all(math.isfinite(v) for v in floats)
    nulls = [p for p, v in leaves if v is None]
    assert all(any(key in NULLABLE for key in p if isinstance(key, str)) for p in nulls), nulls
    assert len(data["logit_lens"]["emotions"]) == 171
    assert len(data["scenarios"]["items"]) == 60


def test_headline_compares_vectors_with_words(built):
    report, _ = built
    head, base = report["headline"], report["headline"]["baseline"]
    assert head["best_layer"] in LAYERS and head["layer"] == 2
    # Held-out texts lie on the bank's own vectors: near-perfect for them, near chance for words.
    assert head["top1"] > 0.9 and head["top5"] >= head["top1"] and head["showcase_top1"] > 0.9
    assert base["top1"] < 0.2
    for key in ("pc1_valence_r", "pc2_arousal_r"):
        assert 0 <= head[key] <= 1 and 0 <= base[key] <= 1  # sign-aligned
    assert head["scenarios_total"] == base["scenarios_total"] == 60
    assert 0 <= head["scenarios_first"] <= 60 and 0 <= head["scenarios_first_relative"] <= 60
    total = sum(len(t["expect"]) for t in concepts_templates())
    assert head["intensity_total"] == base["intensity_total"] == total
    assert 0 <= head["intensity_met"] <= total
    assert report["steering"]["beats_random"]["of"] == 12
    text = headline_text(report)
    assert "vectors" in text and "words" in text and f"{head['top1']:.1%}" in text


def concepts_templates():
    from emolens.corpus import templates

    return templates()


def test_geometry_with_norms_counts_overlap(built):
    report, _ = built
    geometry = report["geometry"]
    assert geometry["vectors"]["norms"]["n"] == 6  # "unrelated" is not an emotion
    assert geometry["vectors"]["ratings"]["n"] == 171
    members = [m for c in geometry["vectors"]["clusters"] for m in c["members"]]
    assert sorted(members) == sorted(concepts.emotions())
    rsa = np.asarray(geometry["rsa"]["r"])
    assert rsa.shape == (2, 2) and np.allclose(np.diag(rsa), 1.0)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset")]


def test_html_is_self_contained_and_figures_are_pngs(built):
    report, out = built
    page = (out / "report.html").read_text()
    parser = Links()
    parser.feed(page)
    assert parser.urls and all(u.startswith(("data:", "#")) for u in parser.urls), parser.urls
    assert not {"script", "link", "iframe"} & set(parser.tags)
    assert "url(" not in page and "@import" not in page
    images = [u for u in parser.urls if u.startswith("data:image/png;base64,")]
    assert len(images) == len(report["figures"]) == 7  # steering included
    for name in report["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_bank_without_heldout_still_complete(tiny, tmp_path):
    emotions = concepts.emotions()[:40]  # a partial bank, in memory: no held-out file anywhere
    bank = make_bank(tiny, seed=1, emotions=emotions)
    report = write_report(tiny, bank, tmp_path, steering=False, progress=False)
    shown = [e for e in concepts.showcase() if e in emotions]
    assert report["scenarios"]["showcase"] == shown and report["scenarios"]["total"] == 5 * len(
        shown
    )
    assert len(report["logit_lens"]["emotions"]) == 40
    assert report["accuracy"]["table"] is None and report["headline"]["top1"] is None
    assert report["steering"] is None and "accuracy" not in report["figures"]
    assert "n/a" in headline_text(report)
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


# ---------------------------------------------------------------- geometry maths


def test_pc1_tracks_planted_valence_and_signs_are_aligned():
    emotions = concepts.emotions()
    judged = concepts.ratings()
    valence = np.array([judged[e][0] for e in emotions])
    arousal = np.array([judged[e][1] for e in emotions])
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        vectors = rng.normal(size=(len(emotions), 16)) * 0.05
        vectors[:, 3] += sign * (valence - valence.mean())
        result = geo.geometry(vectors, emotions, judged)
        assert result["ratings"]["r"]["PC1"]["valence"] > 0.95
        assert result["variance_explained"][0] > 0.5
    scores = np.column_stack([-valence, -arousal, valence])
    aligned, flipped = geo.align_signs(scores, emotions, judged)
    assert flipped == [True, True, False]
    assert np.array_equal(aligned, np.column_stack([valence, arousal, valence]))


def test_kmeans_clusters_partition_and_find_planted_groups():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 8)) * 5
    vectors = np.repeat(centres, 10, axis=0) + rng.normal(size=(30, 8)) * 0.1
    names = [f"e{i}" for i in range(30)]
    clusters = geo.kmeans(vectors, names, k=3, seed=0)
    assert sorted(len(c["members"]) for c in clusters) == [10, 10, 10]
    groups = {frozenset(int(m[1:]) // 10 for m in c["members"]) for c in clusters}
    assert all(len(g) == 1 for g in groups)
    assert geo.kmeans(vectors, names, k=3, seed=0) == clusters  # fixed seed


def test_cluster_order_rsa_and_undefined_correlations():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(12, 6))
    similarity = geo.cosine_matrix(vectors)
    assert sorted(geo.cluster_order(similarity)) == list(range(12))
    r = geo.rsa([similarity, similarity, geo.cosine_matrix(rng.normal(size=(12, 6)))])
    assert np.allclose(r, r.T) and np.allclose(np.diag(r), 1) and r[0, 1] == pytest.approx(1)
    assert abs(r[0, 2]) < 0.9
    assert geo.pearson([1, 2, 3], [2, 2, 2]) is None and geo.pearson([1, 2], [1, 2]) is None


def test_clean_turns_non_finite_into_null():
    value = clean({"a": float("nan"), "b": np.float32(1.5), "c": (np.int64(2), torch.tensor(3.0))})
    assert value == {"a": None, "b": 1.5, "c": [2, 3.0]}


# ---------------------------------------------------------------- baseline, logit lens


def test_word_baseline_is_centred_and_shaped_like_the_bank(tiny):
    bank = make_bank(tiny)
    words = word_vectors(tiny, ["happy", "sad", "calm"])
    table = tiny.model.get_input_embeddings().weight
    ids = tiny.tokenizer(" sad", add_special_tokens=False)["input_ids"]
    expected = table[ids].mean(0) - torch.stack(
        [table[tiny.tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0)
         for w in ("happy", "sad", "calm")]
    ).mean(0)  # fmt: skip
    assert torch.allclose(words[1], expected.detach(), atol=1e-6)
    base = baseline_bank(tiny, bank)
    assert base.emotions == bank.emotions and base.layers == bank.layers
    assert torch.allclose(base.matrix(1), base.matrix(2))
    assert torch.equal(base.center, bank.center)


def test_logit_lens_is_norm_weight_then_unembedding(tiny):
    name, norm = final_norm(tiny)
    assert name == "model.norm"
    units = torch.nn.functional.normalize(torch.randn(3, tiny.width), dim=-1)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, tiny.width))
    try:
        lens = logit_lens(tiny, units, ["a", "b", "c"], k=5)
        logits = (units * norm.weight) @ tiny.model.get_output_embeddings().weight.T
    finally:
        with torch.no_grad():
            norm.weight.fill_(1.0)
    logits[:, tiny.tokenizer.all_special_ids] = -math.inf
    top = [tiny.tokenizer.decode([int(i)]) for i in logits[1].topk(5).indices]
    assert [t for t, _ in lens["emotions"]["b"]["top"]] == top
    values = [v for _, v in lens["emotions"]["b"]["top"]]
    assert values == sorted(values, reverse=True)
    bottom = [v for _, v in lens["emotions"]["b"]["bottom"]]
    assert bottom == sorted(bottom) and bottom[0] < values[-1]


# ---------------------------------------------------------------- scenarios, intensity


def test_last_token_states_match_unpadded_forwards(tiny):
    texts = ["short", "a much longer message about a missing dog and a storm", "mid length"]
    states = last_token_states(tiny, texts, 2, batch_size=3)
    for text, state in zip(texts, states, strict=True):
        ids = torch.tensor([prompt_ids(tiny, text)])
        with torch.inference_mode():
            hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[3]
        assert torch.allclose(state, hidden[0, -1], atol=1e-4)
    assert tiny.tokenizer.decode(prompt_ids(tiny, "hi")[-12:]) == "\n<|im_start|>assistant\n"


def test_plain_format_reads_the_colon_of_assistant():
    lm = tiny_llama()
    lm.tokenizer = byte_tokenizer(chat_template=None)
    assert not lm.has_chat_template
    ids = prompt_ids(lm, "I lost my keys.")
    assert lm.tokenizer.decode(ids[-10:]).endswith("Assistant:")


def test_scenario_ranks_and_first_count():
    emotions = ["afraid", "calm", "happy", "joyful"]
    rows = [{"id": "s1", "emotion": "afraid", "text": ""},
            {"id": "s2", "emotion": "calm", "text": ""},
            {"id": "s3", "emotion": "joyful", "text": ""}]  # fmt: skip
    scores = np.array([[3.0, 1.0, 0.0, 5.0], [1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 9.0]])
    result = score_scenarios(rows, scores, emotions, ["afraid", "calm", "happy"])
    ranks = [(i["rank_showcase"], i["rank_all"]) for i in result["items"]]
    assert ranks == [(1, 2), (3, 3), (None, 1)]
    assert result["first"] == 1 and result["total"] == 2
    assert result["items"][0]["rank_relative"] == 1  # afraid: 3 vs mean 4/3
    assert rank(np.array([1.0, 1.0, 0.5]), 1) == 1


def test_intensity_expectations_use_spearman_sign_and_threshold():
    assert spearman([1, 2, 3, 4]) == pytest.approx(1.0) and spearman([2, 2, 2]) is None
    assert met(0.6, "up") and not met(0.4, "up") and met(-0.5, "down") and not met(0.9, "down")
    assert not met(None, "up")
    templates = [
        {"id": "t", "template": "{X}", "values": [1, 2, 3, 4],
         "expect": {"afraid": "up", "calm": "down", "zzz": "up"}},
    ]  # fmt: skip
    emotions = ["afraid", "calm", "happy"]
    scores = np.array([[0, 3, 1], [1, 2, 0], [2, 2.5, 1], [3, 4, 0]], dtype=float)
    result = score_templates(templates, scores, emotions)
    expect = result["templates"][0]["expect"]
    assert expect["afraid"]["met"] and not expect["calm"]["met"]
    assert result["met"] == 1 and result["total"] == 2
    assert result["templates"][0]["missing"] == ["zzz"]
    assert set(result["templates"][0]["curves"]) == {"afraid", "calm", "happy"}


# ---------------------------------------------------------------- CLI, embedded model


def test_cli_parses_report_options():
    from emolens.cli import build_parser

    args = build_parser().parse_args(
        ["report", "--bank", "b.safetensors", "--norms", "n.csv", "--no-steering", "--layer", "3"]
    )
    assert args.bank == "b.safetensors" and args.no_steering and args.layer == 3
    assert args.out is None and callable(args.run)


@pytest.mark.slow
def test_embedded_scenarios_read_the_assistant_header(embedded):
    ids = prompt_ids(embedded, "My dog has been missing for 14 days.")
    assert embedded.tokenizer.decode(ids[-4:]).endswith("<|im_start|>assistant\n")
    texts = ["My dog has been missing for 14 days.", "I just won the lottery!", "Hi."]
    layer = embedded.default_layer()
    batched = last_token_states(embedded, texts, layer, batch_size=3)
    single = torch.stack([last_token_states(embedded, [t], layer)[0] for t in texts])
    assert torch.allclose(batched, single, atol=1e-3, rtol=1e-3)
