"""Steering validation: packed word scoring, cached perplexity, the typed result and its JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from emolens.bank import random_bank
from emolens.concepts import showcase
from emolens.errors import EmolensError
from emolens.evaluate.steering import (
    SteeringResult,
    SteeringSettings,
    evaluate_steering,
    generate_rows,
    probe_ids,
    sequence_nll,
    word_logprobs,
)
from emolens.report.figures import plot_steering
from emolens.steer import steer_vectors


@pytest.fixture(scope="module")
def bank(tiny):
    bank = random_bank(showcase(), list(range(tiny.depth)), tiny.width, norm=4.0, seed=2)
    bank.default_layer = 2
    return bank


def naive_logprob(lm, ids, word):
    piece = lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([list(ids) + piece])).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)
    return sum(float(logprobs[len(ids) - 1 + j, t]) for j, t in enumerate(piece))


def test_packed_word_scoring_equals_one_forward_per_word(tiny):
    ids = tiny.tokenizer("How does he feel? He feels")["input_ids"]
    words = ["sad", "happy", "at ease"]  # several tokens each with the byte tokenizer
    packed = word_logprobs(tiny, ids, words, rows=2)
    assert packed.shape == (2, 3) and torch.equal(packed[0], packed[1])
    for w, word in enumerate(words):
        assert float(packed[0, w]) == pytest.approx(naive_logprob(tiny, ids, word), abs=1e-4)


def test_packed_scoring_under_per_row_steering(tiny):
    ids = tiny.tokenizer("I feel")["input_ids"]
    vectors = torch.randn(2, tiny.width) * 3
    with steer_vectors(tiny, {1: vectors}):
        packed = word_logprobs(tiny, ids, ["calm", "sad"], rows=2)
    for row in range(2):
        with steer_vectors(tiny, {1: vectors[row]}):
            want = [naive_logprob(tiny, ids, word) for word in ("calm", "sad")]
        assert packed[row].tolist() == pytest.approx(want, abs=1e-4)


def test_cached_sequence_nll_equals_a_full_forward(tiny):
    ids = tiny.tokenizer("Tell me a story.")["input_ids"]
    generated = torch.randint(3, 200, (3, 5))
    alive = torch.ones(3, 5, dtype=torch.bool)
    alive[1, 3:] = False
    got = sequence_nll(tiny, ids, generated, alive)
    for row in range(3):
        with torch.inference_mode():
            full = tiny.model(input_ids=torch.cat([torch.tensor(ids), generated[row]])[None])
        logprobs = torch.log_softmax(full.logits[0].double(), -1)
        want = -sum(
            float(logprobs[len(ids) - 1 + j, generated[row, j]]) for j in range(5) if alive[row, j]
        )
        assert float(got[row]) == pytest.approx(want, abs=1e-4)


def test_generate_rows_steers_each_row_and_stops_counting_after_eos(tiny):
    ids = tiny.tokenizer("Hello")["input_ids"]
    vectors = torch.randn(2, tiny.width, generator=torch.Generator().manual_seed(4)) * 8
    generated, alive = generate_rows(tiny, ids, {1: vectors}, 6)
    assert generated.shape[0] == alive.shape[0] == 2 and generated.shape[1] <= 6
    for row in range(2):
        alone, _ = generate_rows(tiny, ids, {1: vectors[row : row + 1]}, 6)
        n = int(alive[row].sum())
        assert generated[row, :n].tolist() == alone[0, :n].tolist()
    eos = tiny.tokenizer.eos_token_id
    for row in range(2):
        hits = (generated[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else generated.shape[1]
        assert alive[row, :end].all() and not alive[row, end:].any()
    plain, _ = generate_rows(tiny, ids, None, 6)
    assert plain.shape[0] == 1


def test_probes_use_plain_text_and_the_chat_template(tiny):
    probes = probe_ids(tiny)
    assert probes["he"][0] == "How does he feel? He feels"
    assert probes["I"][0].endswith("<|im_start|>assistant\nI feel")
    assert "How do you feel?" in probes["I"][0]


def all_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from all_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_evaluate_steering_on_the_tiny_model(tiny, bank, tmp_path):
    emotions = ["happy", "sad", "calm"]
    settings = SteeringSettings(
        strengths=(0.5, 2.0), n_random=2, generation_prompts=("Hi",), max_new_tokens=3
    )
    result = evaluate_steering(tiny, bank, settings, emotions=emotions)
    assert isinstance(result, SteeringResult)
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))  # no NaN/inf
    assert all(math.isfinite(v) for v in all_numbers(data))
    expected = {
        "model", "layer", "variant", "norm", "strengths", "emotions", "random", "probes",
        "baseline", "delta", "summary", "beats_random", "specific", "perplexity",
        "degrades_at", "degrade_factor", "examples", "seconds",
    }  # fmt: skip
    assert set(data) == expected
    assert result.strengths == [0.0, 0.5, 2.0] and result.layer == 2
    assert result.random == ["random:0", "random:1"]
    for name in emotions:
        for series in dataclasses.astuple(result.summary[name]):
            assert len(series) == 3 and series[0] == 0.0
    assert any(v != 0 for v in result.summary["happy"].own[1:])
    assert result.reference == 0.5 and result.beats_random.of == 3
    assert 0 <= result.beats_random_at_reference <= 3
    assert set(result.beats_random.per_strength) == {0.0, 0.5, 2.0}
    counts = data["beats_random"]
    assert counts == {"reference": 0.5, "count": result.beats_random_at_reference, "of": 3,
                      "per_strength": {"0.0": counts["per_strength"]["0.0"],
                                       "0.5": result.beats_random_at_reference,
                                       "2.0": counts["per_strength"]["2.0"]}}  # fmt: skip
    assert set(data["specific"]) == {"of", "per_strength"}
    for probe in ("he", "I"):
        assert set(result.delta[probe]) == set(emotions) | {"random:0", "random:1"}
    ppl = result.perplexity
    assert ppl.unsteered >= 1.0 and len(ppl.emotions) == len(ppl.random) == 3
    assert ppl.emotions[0] == pytest.approx(ppl.unsteered, rel=1e-4)
    assert ppl.ratio[0] == pytest.approx(1.0, rel=1e-4)
    assert result.degrades_at in (None, 0.5, 2.0)
    assert set(result.examples.steered["happy"]) == {"0.0", "0.5", "2.0"}
    path = plot_steering(result, tmp_path / "steering.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steering_settings_refuse_bad_requests(tiny, bank):
    with pytest.raises(EmolensError, match="dose range"):
        SteeringSettings(strengths=(-0.1, 0.1))
    with pytest.raises(EmolensError, match="dose range"):
        SteeringSettings(strengths=(float("nan"),))
    with pytest.raises(EmolensError, match="n_random"):
        SteeringSettings(n_random=0)
    with pytest.raises(EmolensError, match="generation prompt"):
        SteeringSettings(generation_prompts=())
    short = SteeringSettings(strengths=(0.1,))
    with pytest.raises(EmolensError, match="unknown emotion"):
        evaluate_steering(tiny, bank, short, emotions=["bored"])
    with pytest.raises(EmolensError, match="not in this bank"):
        evaluate_steering(tiny, bank, short, emotions=["happy"], layer=9)
