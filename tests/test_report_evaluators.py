"""The report's evaluators on inputs whose answer is known: geometry, the word baseline, the
logit lens, scenarios and intensity; each returns a frozen dataclass that serialises to JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from emolens import concepts
from emolens.bank import random_bank
from emolens.evaluate import geometry as geo
from emolens.evaluate.baseline import baseline_bank, word_vectors
from emolens.evaluate.intensity import met, score_templates, spearman
from emolens.evaluate.logit_lens import final_norm, logit_lens
from emolens.evaluate.scenarios import last_token_states, rank, score_scenarios
from tests.conftest import byte_tokenizer, tiny_llama


def prompt_ids(lm, text):
    return lm.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)


# ---------------------------------------------------------------- geometry


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
        assert result.ratings.r["PC1"].valence > 0.95
        assert result.variance_explained[0] > 0.5
        assert result.norms is None
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
    assert sorted(len(c.members) for c in clusters) == [10, 10, 10]
    groups = {frozenset(int(m[1:]) // 10 for m in c.members) for c in clusters}
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
    assert geo.rsa([similarity]).tolist() == [[1.0]]  # a one-layer bank


def test_bank_geometry_gives_none_for_undefined_structure_and_valid_json():
    emotions = concepts.emotions()[:12]
    rng = np.random.default_rng(3)
    varied = rng.normal(size=(12, 8))
    same = np.tile(rng.normal(size=8), (12, 1))  # every cosine is 1: a constant structure
    result = geo.bank_geometry(
        np.stack([varied, same]), varied, [4, 7], 4, emotions, concepts.ratings(),
        ratings_source="test", k=3,
    )  # fmt: skip
    assert result.rsa.layers == [4, 7]
    assert result.rsa.r[0][0] == pytest.approx(1.0) and result.rsa.r[0][1] is None
    assert result.baseline_similarity_r == pytest.approx(1.0)  # the words are the vectors
    data = result.to_json()
    assert data["kmeans"] == {"k": 3, "seed": 0} and data["vectors"]["norms"] is None
    json.dumps(data, allow_nan=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.k = 5


# ---------------------------------------------------------------- baseline, logit lens


def test_word_baseline_is_centred_and_shaped_like_the_bank(tiny):
    bank = random_bank(concepts.emotions(), [1, 2], tiny.width, norm=3.0, seed=0)
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
    assert [t for t, _ in lens.emotions["b"].top] == top
    values = [v for _, v in lens.emotions["b"].top]
    assert values == sorted(values, reverse=True)
    bottom = [v for _, v in lens.emotions["b"].bottom]
    assert bottom == sorted(bottom) and bottom[0] < values[-1]
    data = json.loads(json.dumps(lens.to_json(), allow_nan=False))
    assert data["k"] == 5 and data["emotions"]["b"]["top"][0] == list(lens.emotions["b"].top[0])


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
    ranks = [(i.rank_showcase, i.rank_all) for i in result.items]
    assert ranks == [(1, 2), (3, 3), (None, 1)]
    assert result.first == 1 and result.total == 2
    assert result.items[0].rank_relative == 1  # afraid: 3 vs mean 4/3
    assert result.by_emotion.rows == ["afraid", "calm"]
    assert result.to_json()["items"][2]["rank_showcase"] is None
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
    expect = result.templates[0].expect
    assert expect["afraid"].met and not expect["calm"].met
    assert result.met == 1 and result.total == 2
    assert result.templates[0].missing == ["zzz"]
    assert set(result.templates[0].curves) == {"afraid", "calm", "happy"}
    assert result.to_json()["templates"][0]["expect"]["calm"]["direction"] == "down"


@pytest.mark.slow
def test_embedded_scenarios_read_the_assistant_header(embedded):
    ids = prompt_ids(embedded, "My dog has been missing for 14 days.")
    assert embedded.tokenizer.decode(ids[-4:]).endswith("<|im_start|>assistant\n")
    texts = ["My dog has been missing for 14 days.", "I just won the lottery!", "Hi."]
    layer = embedded.default_layer()
    batched = last_token_states(embedded, texts, layer, batch_size=3)
    single = torch.stack([last_token_states(embedded, [t], layer)[0] for t in texts])
    assert torch.allclose(batched, single, atol=1e-3, rtol=1e-3)


def test_axes_find_a_planted_valence_axis_and_a_stable_split_half():
    from emolens.evaluate.axes import evaluate_axes

    rng = np.random.default_rng(0)
    emotions = concepts.emotions()
    judged = concepts.ratings()
    valence = np.array([judged[e][0] for e in emotions]) - 4
    direction = rng.normal(size=64)
    vectors = np.outer(valence, direction) * 3 + rng.normal(size=(len(emotions), 64))
    halves = (
        vectors + 0.1 * rng.normal(size=vectors.shape),
        vectors + 0.1 * rng.normal(size=vectors.shape),
    )
    result = evaluate_axes(vectors, emotions, judged, halves=halves, stories=100)
    first = result.components[0]
    assert abs(first.valence_r) > 0.9 and first.variance > 0.1
    assert len(result.components) == 10 and sum(c.variance for c in result.components) <= 1
    assert result.fit_valence_r > 0.9 and result.rated == len(emotions)
    assert result.split_half.component_cosine[0] > 0.95 and result.split_half.pc1_scores_r > 0.95
    lows = {judged[e][0] for e in first.low}
    highs = {judged[e][0] for e in first.high}
    assert (max(lows) < min(highs)) or (min(lows) > max(highs))  # the ends are the extremes
    assert json.dumps(result.to_json())


def test_transfer_scores_every_reading_and_picks_on_the_other_half(tiny):
    from emolens.corpus import load
    from emolens.evaluate.baseline import baseline_bank
    from emolens.evaluate.transfer import evaluate_transfer, half

    lm = tiny_llama(context=4096)
    corpus = load()
    records = [r for r in corpus.genres("validation") if r.emotion in ("calm", "afraid", "happy")]
    records = records[::6]
    bank = random_bank(["calm", "afraid", "happy", "sad"], [1, 2], lm.width, seed=3)
    bank.model = dict(lm.fingerprint)
    neutral = [r.text for r in corpus.neutral()[:3]]
    result = evaluate_transfer(lm, bank, records, neutral, layer=2, words=baseline_bank(lm, bank))
    assert result.emotions == ("calm", "afraid", "happy") and result.texts == len(records)
    names = set(result.first_half)
    assert (
        "chat/reply_start/denoised/neutral" in names and "plain/reply_start/raw/none" not in names
    )
    assert len(names) == 2 * 3 * (3 + 4)  # variants x calibrations x (plain pools + chat pools)
    assert "plain/mean/denoised/centre" in names
    assert result.chosen in names and set(result.words) == {
        n.replace("/raw/", "/words/").replace("/denoised/", "/words/") for n in names
    }
    for part, table in ((0, result.first_half), (1, result.second_half)):
        counted = sum(s.n for s in table[result.chosen].values())
        assert counted == sum(half(r.id) == part for r in records)
    for rows in result.second_half.values():
        for scores in rows.values():
            assert scores.top1 is None or 0 <= scores.top1 <= scores.top5_all <= 1
    assert json.dumps(result.to_json())
