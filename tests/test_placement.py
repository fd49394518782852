"""Blocks on several devices (a model split like `load_model(device="auto")` on many GPUs).

This machine has no GPU, so two things are checked instead of a real two-GPU run:
- the tiny model dispatched by accelerate in two block groups, with accelerate's hooks forced
  (the machinery `device_map` uses to move tensors between GPUs): capture, steering, batched
  and live readouts give exactly the numbers of the undispatched model, so emolens' hooks
  compose with accelerate's;
- a block moved to the meta device (a second device whose tensors have shapes but no
  values): the steering hook adds its CPU vector there, the capture hook receives the
  block's output there, and the readout scores it there (the bank's vectors follow the
  states); a device mismatch would raise.
What is not proven here: a real forward pass across two GPUs (pooling of captured batches
gathers each layer on the CPU, and the live readout moves the bank to the read block's device,
but only CPU runs exercise those lines), nor speed.
"""

from __future__ import annotations

import torch
from accelerate import dispatch_model

from emolens.bank import random_bank
from emolens.capture import capture, hooks
from emolens.readout import generate, read_many, score
from emolens.steer import patch_vectors
from tests.conftest import tiny_llama

EMOTIONS = ["calm", "afraid", "happy"]
TEXTS = ["The river ran under the old bridge.", "She opened the letter and sat down slowly."]


def split(lm):
    """`lm` dispatched with blocks 0-1 and 2-3 as two groups, accelerate's hooks forced."""
    groups = {f"{lm.layers_path}.{i}": "cpu" for i in range(lm.depth)}
    rest = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
            "lm_head": "cpu"}  # fmt: skip
    dispatch_model(lm.model, device_map=rest | groups, force_hooks=True)
    assert all(hasattr(block, "_hf_hook") for block in lm.layers)
    return lm


def outputs(lm, bank):
    """Captured pooled residuals, steered residuals, batched and live readouts."""
    pooled = torch.cat([b.pooled() for b in capture(lm, TEXTS, [1, 3], offset=2)])
    vector = bank.steering({"calm": 0.5}, [2])
    with vector.apply(lm):
        steered = torch.cat([b.pooled() for b in capture(lm, TEXTS, [3], offset=2)])
    scores = read_many(lm, bank, TEXTS, layer=3, pool="mean")
    live = torch.stack([t.scores for t in generate(lm, bank, "Hello", layer=3, max_new_tokens=6)])
    return pooled, steered, scores, live


def test_a_model_dispatched_over_block_groups_gives_the_same_numbers():
    plain = tiny_llama()
    bank = random_bank(EMOTIONS, list(range(plain.depth)), plain.width, norm=3.0, seed=1)
    bank.model = dict(plain.fingerprint)
    expected = outputs(plain, bank)
    for got, want in zip(outputs(split(tiny_llama()), bank), expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(expected[0][:, 1], expected[1][:, 0])  # steering changed layer 3


def test_hooks_and_readout_follow_a_block_on_another_device():
    lm = tiny_llama()
    bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, norm=3.0, seed=1)
    block = lm.layers[3].to("meta")  # the second "device"
    hidden = torch.randn(1, 5, lm.width, device="meta")
    positions = torch.arange(5)[None]
    cos, sin = lm.model.model.rotary_emb(torch.zeros(1, 5, lm.width), positions)
    seen = {}
    steering = patch_vectors(lm, {3: torch.ones(lm.width)})  # a CPU vector
    try:
        with hooks(lm, {3: lambda h: seen.__setitem__(3, h)}):
            out = block(hidden, position_embeddings=(cos.to("meta"), sin.to("meta")))
    finally:
        steering.remove()
    out = out[0] if isinstance(out, tuple) else out
    assert out.device.type == "meta" and seen[3].device.type == "meta"
    assert score(seen[3], bank, 3).device.type == "meta"  # the bank's vectors moved there
