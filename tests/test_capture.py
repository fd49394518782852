import pytest
import torch

from emolens.capture import capture, plan_batches, residuals
from emolens.errors import EmolensError

TEXTS = [
    "The ferry rocked as the harbour lights came into view over the water.",
    "Short one.",
    "A much longer text about a library, its late fees, and the clerk who stamps cards all day "
    "without looking up from the counter, while rain taps on the window.",
]


def hidden(lm, text):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return lm.model(**ids, output_hidden_states=True).hidden_states


def test_captured_residuals_equal_output_hidden_states(tiny):
    for batch in capture(tiny, TEXTS, [0, 2], offset=0, batch_size=2):
        for row, index in enumerate(batch.indices):
            states = hidden(tiny, TEXTS[index])
            n = states[0].shape[1]
            for layer in (0, 2):
                got = batch.residuals[layer][row][batch.attention_mask[row].bool()]
                assert got.shape[0] == n
                assert torch.allclose(got, states[layer + 1][0], atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_single_text_runs(tiny, side):
    single = {}
    for i, text in enumerate(TEXTS):
        (batch,) = capture(tiny, [text], [1, 3], offset=3, batch_size=1)
        single[i] = batch.pooled()[0]
    for batch in capture(tiny, TEXTS, [1, 3], offset=3, batch_size=3, padding_side=side):
        for row, index in enumerate(batch.indices):
            assert torch.allclose(batch.pooled()[row], single[index], atol=1e-5)


def test_pooling_skips_offset_padding_and_special_tokens(tiny):
    text = "<|im_start|>user\nabc<|im_end|>"
    (batch,) = capture(tiny, [text, "x" * 40], [1], offset=2, batch_size=2)
    row = batch.indices.index(0)
    ids, mask = batch.input_ids[row], batch.pool_mask[row]
    specials = {tiny.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert not any(int(t) in specials for t in ids[mask])
    assert not mask[:2].any() and not mask[batch.attention_mask[row] == 0].any()
    expected = batch.residuals[1][row][mask].mean(0)
    assert torch.allclose(batch.pooled()[row, 0], expected, atol=1e-6)


def test_capture_stops_after_the_deepest_layer(tiny):
    calls = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, block in enumerate(tiny.layers)
    ]
    try:
        ids = tiny.tokenizer(["hello"], return_tensors="pt")
        residuals(tiny, ids.input_ids, ids.attention_mask, [0, 1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_resume_skips_whole_batches_in_the_same_plan(tiny):
    plan = plan_batches([[1] * n for n in (5, 9, 2, 7, 3)], 2)
    assert plan == [[1, 3], [0, 4], [2]]
    done = [b.number for b in capture(tiny, TEXTS, [0], batch_size=1)][:1]
    rest = list(capture(tiny, TEXTS, [0], batch_size=1, done=done))
    assert [b.number for b in rest] == [1, 2]


def test_bad_input_is_refused(tiny):
    with pytest.raises(EmolensError, match="no texts"):
        list(capture(tiny, [], [0]))
    with pytest.raises(EmolensError, match="out of range"):
        list(capture(tiny, ["a"], [7]))
    with pytest.raises(EmolensError, match="reads at most 512"):
        list(capture(tiny, ["x" * 600], [0]))


@pytest.mark.slow
def test_embedded_capture_matches_output_hidden_states(embedded):
    text = "My grandmother's recipe card was stained with butter, and the oven had been ticking for an hour."
    (batch,) = capture(embedded, [text], [10, 20], offset=0)
    states = hidden(embedded, text)
    for layer in (10, 20):
        assert torch.allclose(batch.residuals[layer][0], states[layer + 1][0], atol=1e-3, rtol=1e-4)


def test_one_hook_primitive_reads_replaces_stops_and_cleans_up(tiny):
    from emolens.capture import StopForward, add_hooks, hooks, run

    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = tiny.model(input_ids=ids, output_hidden_states=True)
    seen, calls, before = {}, [], []
    shift = torch.randn(tiny.width)
    registered = [dict(block._forward_hooks) for block in tiny.layers]

    def read(layer):
        def fn(hidden):
            seen[layer] = hidden.clone()
            calls.append(layer)

        return fn

    with torch.inference_mode(), hooks(tiny, {0: read(0), 1: lambda h: h + shift, 2: read(2)},
                                       stop_after=2, before=lambda bound: before.append(bound)) as handle:  # fmt: skip
        assert run(tiny, input_ids=ids) is None  # stopped: no logits
        assert calls == [0, 2] and set(before[0]) >= {"input_ids"}
        handle.stop_after = None
        assert run(tiny, input_ids=ids).logits.shape[:2] == (2, 7)
    torch.testing.assert_close(seen[0], base.hidden_states[1])
    assert not torch.allclose(seen[2], base.hidden_states[3])  # block 1's output was replaced
    assert [dict(block._forward_hooks) for block in tiny.layers] == registered
    handle = add_hooks(tiny, {}, stop_after=0)
    with pytest.raises(StopForward):
        tiny.model(input_ids=ids)
    handle.remove()
    with pytest.raises(EmolensError, match="out of range"):
        add_hooks(tiny, {9: print})
    assert [dict(block._forward_hooks) for block in tiny.layers] == registered
