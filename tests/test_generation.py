"""The one decoding loop: batched rows equal single rows, rows join and leave, per-row
sampling, stopping and steering, and the residuals it reads equal a full forward."""

from __future__ import annotations

import pytest
import torch

from emolens.capture import residuals
from emolens.errors import EmolensError
from emolens.generation import Decoder, Sampling, decode
from emolens.steer import SteeringVector

PROMPTS = ["Hello there, how are you today?", "Hi", "A much longer prompt about the sea and ships."]


def ids_of(lm, text):
    return lm.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)


def no_eos(lm):
    """A logit bias that makes end-of-sequence impossible (rows run to max_new_tokens)."""

    def hook(module, args, output):
        output[..., lm.tokenizer.eos_token_id] = -1e9
        return output

    return lm.model.lm_head.register_forward_hook(hook)


def test_a_batch_equals_one_prompt_at_a_time(tiny):
    prompts = [ids_of(tiny, p) for p in PROMPTS]
    handle = no_eos(tiny)
    try:
        together = decode(tiny, prompts, Sampling(8), read_layers=[1, 3], keep=True)
        alone = [decode(tiny, [p], Sampling(8), read_layers=[1, 3], keep=True)[0] for p in prompts]
    finally:
        handle.remove()
    for batched, single in zip(together, alone, strict=True):
        assert batched.tokens == single.tokens and len(batched.tokens) == 8
        assert batched.finish == "length"
        for layer in (1, 3):
            torch.testing.assert_close(batched.residuals[layer], single.residuals[layer],
                                       atol=1e-4, rtol=0)  # fmt: skip
    # the residuals read while decoding equal a full forward over prompt + reply
    first = together[0]
    ids = torch.tensor([first.prompt + first.tokens])
    full = residuals(tiny, ids, torch.ones_like(ids), [3])[3][0]
    torch.testing.assert_close(first.residuals[3], full[len(first.prompt) :], atol=1e-4, rtol=0)
    torch.testing.assert_close(first.prompt_residuals[3], full[len(first.prompt) - 1], atol=1e-4,
                               rtol=0)  # fmt: skip


def test_rows_join_a_running_batch_and_leave_it(tiny):
    prompts = [ids_of(tiny, p) for p in PROMPTS]
    handle = no_eos(tiny)
    try:
        want = [decode(tiny, [p], Sampling(n), read_layers=[2], keep=True)[0]
                for p, n in zip(prompts, (3, 9, 6), strict=True)]  # fmt: skip
        decoder = Decoder(tiny, [2], keep=True)
        decoder.add("a", prompts[0], Sampling(3))
        decoder.step()
        decoder.step()
        decoder.add("b", prompts[1], Sampling(9))  # joins while "a" decodes
        decoder.step()
        assert [r.key for r in decoder.rows] == ["b"]  # "a" finished after 3 tokens
        decoder.add("c", prompts[2], Sampling(6))
        decoder.run()
    finally:
        handle.remove()
    for key, expected in zip("abc", want, strict=True):
        got = decoder.finished[key]
        assert got.tokens == expected.tokens
        torch.testing.assert_close(got.residuals[2], expected.residuals[2], atol=1e-4, rtol=0)


def test_per_row_steering_equals_steering_each_row_alone(tiny):
    prompts = [ids_of(tiny, p) for p in PROMPTS[:2]]
    vector = SteeringVector(
        {1: torch.randn(tiny.width, generator=torch.Generator().manual_seed(1)) * 6}
    )
    handle = no_eos(tiny)
    try:
        rows = decode(tiny, prompts, Sampling(6), steering=[vector, None], mode="response",
                      read_layers=[2], keep=True)  # fmt: skip
        steered = decode(tiny, prompts[:1], Sampling(6), steering=vector, mode="response",
                         read_layers=[2], keep=True)[0]  # fmt: skip
        plain = decode(tiny, prompts[1:], Sampling(6), read_layers=[2], keep=True)[0]
        with vector.apply(tiny, "response"):  # the same through the model-level patch
            patched = decode(tiny, prompts[:1], Sampling(6))[0]
    finally:
        handle.remove()
    assert rows[0].tokens == steered.tokens == patched.tokens and rows[1].tokens == plain.tokens
    torch.testing.assert_close(rows[0].residuals[2], steered.residuals[2], atol=1e-4, rtol=0)
    # "response" mode leaves the prompt alone: the first pick is the unsteered one
    assert decode(tiny, prompts[:1], Sampling(1))[0].tokens == rows[0].tokens[:1]


def test_steering_and_halting_mid_reply(tiny):
    prompt = ids_of(tiny, PROMPTS[0])
    vector = SteeringVector({1: torch.full((tiny.width,), 5.0)})
    handle = no_eos(tiny)
    try:
        plain = decode(tiny, [prompt], Sampling(6))[0]
        decoder = Decoder(tiny)
        decoder.add(0, prompt, Sampling(6))
        steps = decoder.step() + decoder.step()
        decoder.steer(0, vector)
        while decoder.busy:
            steps += decoder.step()
            if len(steps) == 5:
                decoder.halt(0)
    finally:
        handle.remove()
    got = decoder.finished[0]
    assert got.finish == "halt" and len(got.tokens) == 5
    assert got.tokens[:3] == plain.tokens[:3]  # steering starts with the third fed token
    assert [s.index for s in steps] == list(range(5))
    assert "".join(s.text for s in steps) == tiny.tokenizer.decode(got.tokens)


def test_sampling_is_seeded_per_row_and_stops_at_eos(tiny):
    prompt = ids_of(tiny, "Hi")
    a, b = decode(tiny, [prompt, prompt], [Sampling(8, 1.0, seed=3), Sampling(8, 1.0, seed=3)])
    assert a.tokens == b.tokens
    c = decode(tiny, [prompt], Sampling(8, 1.0, seed=4))[0]
    assert c.tokens != a.tokens

    def always_eos(module, args, output):
        output[..., tiny.tokenizer.eos_token_id] = 1e9
        return output

    registered = [dict(block._forward_hooks) for block in tiny.layers]
    handle = tiny.model.lm_head.register_forward_hook(always_eos)
    try:
        (done,) = decode(tiny, [prompt], Sampling(5))
    finally:
        handle.remove()
    assert done.tokens == [] and done.finish == "stop" and done.stop_token in tiny.eos_ids
    assert [dict(block._forward_hooks) for block in tiny.layers] == registered


def test_bad_requests(tiny):
    for bad in ({"max_new_tokens": 0}, {"temperature": float("nan")}, {"top_p": 0.0},
                {"temperature": -1.0}, {"max_new_tokens": True}):  # fmt: skip
        with pytest.raises(EmolensError):
            Sampling(**bad)
    decoder = Decoder(tiny)
    with pytest.raises(EmolensError, match="empty prompt"):
        decoder.add(0, [], Sampling())
    with pytest.raises(EmolensError, match="reads at most 512"):
        decoder.add(0, [5] * 500, Sampling(20))
    with pytest.raises(EmolensError, match="mode"):
        decoder.add(0, [5], Sampling(), mode="middle")
    decoder.add(0, [5, 6], Sampling(2))
    with pytest.raises(EmolensError, match="already"):
        decoder.add(0, [5], Sampling())
    with pytest.raises(EmolensError, match="one sampling"):
        decode(tiny, [[5], [6]], [Sampling()])
