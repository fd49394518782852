"""Steering hooks add exactly the intended vector at exactly the intended positions."""

from __future__ import annotations

import json

import pytest
import torch

from emolens.bank import random_bank
from emolens.capture import hooks
from emolens.errors import EmolensError
from emolens.steer import (
    MAX_STRENGTH,
    SteeringVector,
    parse_strengths,
    random_direction,
    steer,
    steer_vectors,
)
from tests.conftest import save_for_cli

LAYER = 1
EMOTIONS = ["calm", "desperate", "happy", "sad"]


@pytest.fixture(scope="module")
def bank(tiny):
    bank = random_bank(EMOTIONS, list(range(tiny.depth)), tiny.width, norm=3.0, seed=1)
    bank.default_layer = LAYER
    bank.model = dict(tiny.fingerprint)
    return bank


def emotion_vectors(bank, emotions, layers=None, variant="denoised"):
    return bank.steering(emotions, layers, variant=variant, allow_strong=True).vectors


def hidden(lm, ids, mask=None, layer=LAYER):
    """Block `layer`'s output for a full forward without a cache."""
    with torch.inference_mode():
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[layer + 1]


def hook_counts(lm):
    return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in lm.layers] + [
        len(lm.model.model._forward_pre_hooks)
    ]


def expected_delta(shape, vector, steered):
    """[batch, tokens, width]: `vector` where `steered` [batch, tokens] is True, else 0."""
    return steered[..., None].float() * vector.expand(shape)


def ids_of(batch, tokens, seed=0):
    return torch.randint(3, 200, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_adds_vector_at_every_position_of_the_steered_layer_only(tiny):
    ids, vector = ids_of(2, 9), torch.randn(tiny.width)
    before = [hidden(tiny, ids, layer=k) for k in range(tiny.depth)]
    with steer_vectors(tiny, {LAYER: vector}):
        after = [hidden(tiny, ids, layer=k) for k in range(tiny.depth)]
    assert torch.allclose(after[LAYER] - before[LAYER], vector.expand(2, 9, -1), atol=1e-5)
    assert torch.equal(after[0], before[0])  # earlier blocks untouched
    assert not torch.allclose(after[LAYER + 1], before[LAYER + 1])  # and it propagates


def test_left_padded_batch_with_per_row_spans(tiny):
    ids, vector = ids_of(2, 8), torch.randn(tiny.width)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0: 3 pads, then 5 real tokens
    spans = [[(0, 2)], [(1, 3), (6, 100)]]
    base = hidden(tiny, ids, mask)
    with steer_vectors(tiny, {LAYER: vector}, positions=spans):
        steered = hidden(tiny, ids, mask)
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[0, 3:5] = True  # real tokens 0 and 1 of row 0
    want[1, [1, 2, 6, 7]] = True
    assert torch.allclose(steered - base, expected_delta(base.shape, vector, want), atol=1e-5)


def test_all_positions_never_steer_padding(tiny):
    ids, vector = ids_of(2, 6), torch.randn(tiny.width)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    base = hidden(tiny, ids, mask)
    with steer_vectors(tiny, {LAYER: vector}):
        steered = hidden(tiny, ids, mask)
    assert torch.allclose(
        steered - base, expected_delta(base.shape, vector, mask.bool()), atol=1e-5
    )


def test_flat_spans_apply_to_every_row(tiny):
    ids, vector = ids_of(2, 6), torch.randn(tiny.width)
    base = hidden(tiny, ids)
    with steer_vectors(tiny, {LAYER: vector}, positions=[(1, 2), (4, 5)]):
        steered = hidden(tiny, ids)
    want = torch.zeros(2, 6, dtype=torch.bool)
    want[:, [1, 4]] = True
    assert torch.allclose(steered - base, expected_delta(base.shape, vector, want), atol=1e-5)


def decode(lm, ids, mask, steps):
    """Cached greedy decoding with a 2D mask, as model.generate does: the block output of
    every new position at LAYER, and the whole token sequence."""
    outputs = []
    with torch.inference_mode(), hooks(lm, {LAYER: outputs.append}):
        out = lm.model(input_ids=ids, attention_mask=mask, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = lm.model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
    return torch.cat(outputs, 1), ids, mask


@pytest.mark.parametrize(
    "positions",
    ["all", "prompt", "response", [(4, 7)], [[(0, 2)], [(5, 9)]]],
    ids=["all", "prompt", "response", "span", "per-row"],
)
def test_cached_decoding_of_a_left_padded_batch(tiny, positions):
    """Steered cached decoding equals the unsteered full forward over the same tokens plus the
    vector at exactly the intended absolute positions (prompt: 6 real tokens per row)."""
    ids, vector = ids_of(2, 8, seed=3), torch.randn(tiny.width) * 4
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with steer_vectors(tiny, {LAYER: vector}, positions=positions):
        steered, full_ids, full_mask = decode(tiny, ids, mask, steps=4)
    base = hidden(tiny, full_ids, full_mask)
    real = full_mask.bool()
    index = full_mask.cumsum(1) - 1
    prompt = index < mask.sum(1, keepdim=True)
    if positions == "all":
        want = real
    elif positions == "prompt":
        want = real & prompt
    elif positions == "response":
        want = real & ~prompt
    elif len(positions) == 1:
        want = real & (index >= 4) & (index < 7)
    else:
        want = real & torch.tensor([[0], [5]]).le(index) & index.lt(torch.tensor([[2], [9]]))
    delta = (steered - base)[real]
    assert torch.allclose(delta, expected_delta(base.shape, vector, want)[real], atol=1e-4)
    assert bool(want.any()) and not bool(want[real].all()) or positions == "all"


def test_model_generate_with_steering(tiny):
    """model.generate runs under steering and matches the hand-written cached loop."""
    ids, vector = ids_of(2, 7, seed=5), torch.randn(tiny.width) * 10
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        plain = tiny.model.generate(input_ids=ids, attention_mask=mask, **options)
        with steer_vectors(tiny, {LAYER: vector}, positions="response"):
            steered = tiny.model.generate(input_ids=ids, attention_mask=mask, **options)
            _, manual, _ = decode(tiny, ids, mask, steps=5)
    assert torch.equal(steered, manual)
    assert not torch.equal(steered, plain)
    assert torch.equal(steered[:, : ids.shape[1] + 1], plain[:, : ids.shape[1] + 1])


def test_several_emotions_and_layers(tiny, bank):
    emotions = {"calm": 0.5, "sad": -0.25, "random:7": 0.1}
    vectors = emotion_vectors(bank, emotions, layers=[1, 2])
    for layer, vector in vectors.items():
        want = bank.norm_at(layer) * (
            0.5 * bank.vector("calm", layer)
            - 0.25 * bank.vector("sad", layer)
            + 0.1 * random_direction(tiny.width, 7)
        )
        assert torch.allclose(vector, want, atol=1e-6)
    ids = ids_of(1, 5)
    base = [hidden(tiny, ids, layer=k) for k in (1, 2)]
    with steer(tiny, bank, emotions, layers=[1, 2]) as used:
        after1 = hidden(tiny, ids, layer=1)
    assert used.layers == [1, 2] and used.strengths == emotions
    assert torch.allclose(after1 - base[0], vectors[1].expand(1, 5, -1), atol=1e-5)
    # layer 2 gets its own vector on top of layer 1's downstream effect
    with steer(tiny, bank, emotions, layers=[1]):
        only1 = hidden(tiny, ids, layer=2)
    with steer(tiny, bank, emotions, layers=[1, 2]):
        both = hidden(tiny, ids, layer=2)
    assert torch.allclose(both - only1, vectors[2].expand(1, 5, -1), atol=1e-5)


def test_default_layer_and_strength_units(tiny, bank):
    (layer, vector), *rest = emotion_vectors(bank, {"happy": 0.2}).items()
    assert not rest and layer == bank.default_layer
    assert torch.isclose(vector.norm(), torch.tensor(0.2 * bank.norm_at(layer)), rtol=1e-5)


def test_nested_contexts_add_up(tiny, bank):
    ids = ids_of(1, 6)
    base = hidden(tiny, ids)
    with steer(tiny, bank, {"calm": 0.3}) as first, steer(tiny, bank, {"sad": 0.2}) as second:
        both = hidden(tiny, ids)
        with steer(tiny, bank, {"calm": -0.3}):
            cancelled = hidden(tiny, ids)
    want = (first.vectors[LAYER] + second.vectors[LAYER]).expand(1, 6, -1)
    assert torch.allclose(both - base, want, atol=1e-5)
    assert torch.allclose(cancelled - base, second.vectors[LAYER].expand(1, 6, -1), atol=1e-5)
    assert torch.allclose(hidden(tiny, ids), base)


def test_hooks_removed_after_exit_and_exception(tiny, bank):
    before = hook_counts(tiny)
    ids = ids_of(1, 4)
    base = hidden(tiny, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny, bank, {"calm": 0.5}, layers=[0, 1, 3]):
            assert hook_counts(tiny) != before
            raise RuntimeError("boom")
    assert hook_counts(tiny) == before
    assert torch.equal(hidden(tiny, ids), base)
    with pytest.raises(EmolensError, match="rows"):  # an error inside the forward pass
        with steer_vectors(tiny, {LAYER: torch.ones(tiny.width)}, positions=[[(0, 1)]] * 3):
            hidden(tiny, ids_of(2, 4))
    assert hook_counts(tiny) == before


def test_per_row_vectors(tiny):
    ids = ids_of(3, 5)
    vectors = torch.randn(3, tiny.width)
    base = hidden(tiny, ids)
    with steer_vectors(tiny, {LAYER: vectors}):
        steered = hidden(tiny, ids)
        with pytest.raises(EmolensError, match="one vector per row"):
            hidden(tiny, ids_of(2, 5))
    assert torch.allclose(steered - base, vectors[:, None, :].expand(3, 5, -1), atol=1e-5)


def test_random_direction_is_seeded_unit_and_matched_norm(tiny, bank):
    a, b, c = random_direction(64, 3), random_direction(64, 3), random_direction(64, 4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isclose(a.norm(), torch.tensor(1.0))
    emotion = emotion_vectors(bank, {"calm": 0.1})[LAYER]
    control = emotion_vectors(bank, {"random:3": 0.1})[LAYER]
    assert torch.isclose(emotion.norm(), control.norm(), rtol=1e-5)
    assert abs(float(emotion @ control)) < 0.9 * float(emotion.norm() * control.norm())
    same = SteeringVector.random(bank, 3, 0.1)
    assert torch.equal(same.vectors[LAYER], control) and same.strengths == {"random:3": 0.1}


def test_bad_requests_are_clear_errors(tiny, bank):
    vector = torch.zeros(tiny.width)
    for positions, match in [
        ("middle", "positions"),
        ([(3, 1)], "bad span"),
        ([(-1, 2)], "bad span"),
        ([[(0, 1)], [(0, "x")]], "row 1"),
    ]:
        with pytest.raises(EmolensError, match=match):
            with steer_vectors(tiny, {LAYER: vector}, positions=positions):
                pass
    with pytest.raises(EmolensError, match="out of range"):
        with steer_vectors(tiny, {99: vector}):
            pass
    with pytest.raises(EmolensError, match="must be"):
        with steer_vectors(tiny, {LAYER: torch.zeros(5)}):
            pass
    with pytest.raises(EmolensError, match="unknown emotion"):
        emotion_vectors(bank, {"bored": 0.1})
    with pytest.raises(EmolensError, match="random:SEED"):
        emotion_vectors(bank, {"random:abc": 0.1})
    with pytest.raises(EmolensError, match="finite"):
        emotion_vectors(bank, {"calm": float("nan")})
    with pytest.raises(EmolensError, match=r"outside -1\.\.\.1 .*allow_strong"):
        bank.steering({"calm": 1e9})
    with pytest.raises(EmolensError, match="no emotions"):
        bank.steering({})
    other = random_bank(EMOTIONS, [0, 1], 16)
    with pytest.raises(EmolensError, match="width"):
        other.steering({"calm": 0.1}).patch(tiny)
    with pytest.raises(EmolensError, match="width"):
        with steer(tiny, other, {"calm": 0.1}):
            pass


def test_parse_strengths():
    assert parse_strengths(["calm=0.05", "desperate=-0.1"]) == {"calm": 0.05, "desperate": -0.1}
    assert parse_strengths(["at ease"], default=1.0) == {"at ease": 1.0}
    for bad in ("calm", "calm=x", "=0.1", "calm=inf", "calm=1.5"):
        with pytest.raises(EmolensError):
            parse_strengths([bad])
    with pytest.raises(EmolensError, match="given twice"):
        parse_strengths(["calm=0.05", "calm=0.05"])
    assert parse_strengths(["calm=3"], allow_strong=True) == {"calm": 3.0}
    assert MAX_STRENGTH == 1.0


def test_steering_vector_is_a_value(tiny, bank):
    """Arithmetic is exact: 20 * v steers like v at 20 times the strength (repeng's check);
    v - v is zero, and sums keep their provenance."""
    calm, sad = bank.steering({"calm": 0.01}), bank.steering({"sad": 0.2}, [1, 2])
    twenty = bank.steering({"calm": 0.2})
    torch.testing.assert_close((20 * calm).vectors[LAYER], twenty.vectors[LAYER])
    assert (calm * 20).strengths == {"calm": pytest.approx(0.2)}
    both = calm + sad
    assert both.layers == [1, 2] and both.strengths == {"calm": 0.01, "sad": 0.2}
    torch.testing.assert_close(both.vectors[1], calm.vectors[1] + sad.vectors[1])
    assert float((both - both).vectors[1].abs().max()) == 0
    ids = ids_of(1, 6)
    with torch.inference_mode():
        with (20 * calm).apply(tiny):
            scaled = tiny.model(input_ids=ids).logits
        with twenty.apply(tiny):
            direct = tiny.model(input_ids=ids).logits
        handle = twenty.patch(tiny)
        patched = tiny.model(input_ids=ids).logits
        handle.remove()
        handle.remove()  # idempotent
        plain = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(scaled, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(patched, direct, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, direct)
    with pytest.raises(EmolensError, match="different models"):
        calm + SteeringVector({LAYER: torch.ones(tiny.width)}, {"model": {"weights": "x"}})
    with pytest.raises(EmolensError, match="non-finite"):
        SteeringVector({1: torch.full((4,), float("nan"))})


@pytest.mark.parametrize("suffix", ["gguf", "npz", "safetensors"])
def test_steering_vector_files_round_trip(tiny, bank, tmp_path, suffix):
    vector = bank.steering({"calm": 0.3, "sad": -0.1}, [1, 3])
    path = vector.save(tmp_path / f"v.{suffix}")
    loaded = SteeringVector.load(path)
    assert loaded.layers == [1, 3] and loaded.strengths == {"calm": 0.3, "sad": -0.1}
    for layer in (1, 3):
        torch.testing.assert_close(loaded.vectors[layer], vector.vectors[layer])
    assert loaded.meta["model"]["weights"] == tiny.fingerprint["weights"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing half-written


def test_live_readout_sees_the_steering(tiny, bank):
    """emolens.generate works under steering: its first generated token reads exactly
    strength * norm higher on the steered emotion (the prefill, unsteered, picks it)."""
    from emolens.readout import generate

    def first(**steering):
        messages = [{"role": "user", "content": "hello there"}]
        tokens = generate(tiny, bank, messages, max_new_tokens=3)
        if not steering:
            return list(tokens)
        with steer(tiny, bank, {"happy": 0.4}, positions="response"):
            return list(tokens)

    plain, steered = first(), first(on=True)
    assert plain[0].id == steered[0].id
    index = bank.emotion_index("happy")
    shift = steered[0].scores[index] - plain[0].scores[index]
    assert shift == pytest.approx(0.4 * bank.norm_at(LAYER), rel=1e-4)


# --- the embedded model ------------------------------------------------------------------


@pytest.mark.slow
def test_steering_happy_favours_happy_over_sad(embedded, embedded_bank):
    """The study's check: steering toward "happy" raises " happy" after "He feels", and after
    both "He feels" and the assistant's "I feel" it moves " happy" up more than " sad"."""
    from emolens.evaluate.steering import probe_ids, word_logprobs

    changes = {}
    for name, (text, ids) in probe_ids(embedded).items():
        plain = word_logprobs(embedded, ids, ["happy", "sad"])
        with steer(embedded, embedded_bank, {"happy": 0.1}):
            steered = word_logprobs(embedded, ids, ["happy", "sad"])
        changes[name] = (steered - plain)[0]
        assert changes[name][0] > changes[name][1], (text, plain, steered)
    assert max(change[0] for change in changes.values()) > 0, changes


# --- the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """The tiny model saved as a local directory, and a bank file made for it."""

    def make_bank(lm):
        bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, norm=3.0)
        bank.default_layer = LAYER
        return bank

    return save_for_cli(tmp_path_factory.mktemp("tiny"), tiny, make_bank)[2]


def test_cli_steer(saved, capsys):
    from emolens.cli import main

    args = ["steer", "--emotion", "happy=2", "--emotion", "random:1=0.5", "--max-new-tokens", "4"]
    assert main([*args, "--json", *saved, "hello"]) == 2
    assert "outside -1...1" in capsys.readouterr().err
    args.append("--allow-strong")
    assert main([*args, "--json", *saved, "hello"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steering"] == {"happy": 2.0, "random:1": 0.5} and result["layer"] == LAYER
    for name in ("unsteered", "steered"):
        assert isinstance(result[name]["text"], str)
        assert set(result[name]["readout"]) == {"happy"}  # random directions are not read
    assert main([*args, "--positions", "response", *saved, "hello"]) == 0
    out = capsys.readouterr().out
    assert "[unsteered]" in out and "steered: happy=+2, random:1=+0.5 at layer 1" in out
    assert main(["steer", "--emotion", "happy", *saved, "hello"]) == 2
    assert "give a strength" in capsys.readouterr().err


def test_cli_chat(saved, capsys, monkeypatch):
    from emolens.cli import main

    lines = iter(
        ["/steer happy=1 sad=-0.5", "/steer bored=1", "hello", "/top 2", "/unsteer", "", "hi",
         "/top x", "/reset", "/help", "/quit", "never read"]
    )  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3", *saved]) == 0
    out = capsys.readouterr().out
    assert "steering: happy=+1, sad=-0.5" in out
    assert "unknown emotion 'bored'" in out
    readouts = [line for line in out.splitlines() if line.startswith("    [")]
    assert len(readouts) == 2
    assert len(readouts[0].strip().split("]")[0].split("  ")) == 3  # top 3 by default
    assert "includes steering happy=+1, sad=-0.5" in readouts[0]
    assert len(readouts[1].strip().split("]")[0].split("  ")) == 2  # after /top 2
    assert "steering" not in readouts[1]
    assert "usage: /top N" in out and "conversation cleared" in out
    assert next(lines) == "never read"
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert main(["chat", *saved]) == 0  # end of input ends the chat
