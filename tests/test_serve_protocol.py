"""The server's pure parts: request checking and the readout maths, without a server."""

from __future__ import annotations

import json

import pytest
import torch

from emolens.bank import random_bank
from emolens.generation import Sampling
from emolens.serve.lens import Lens, Reading
from emolens.serve.protocol import Defaults, Limits, RequestError, chunk, parse_request

EMOTIONS = ["calm", "desperate", "happy", "sad", "afraid"]
BANK = random_bank(EMOTIONS, [1, 2, 3], 16, seed=2)
LIMITS = Limits(max_tokens=100, max_messages=4)
DEFAULTS = Defaults(Sampling(max_new_tokens=30, temperature=0.0))
USER = [{"role": "user", "content": "hi"}]


def parse(body: object, kind: str = "chat"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, kind, "tiny", BANK, LIMITS, DEFAULTS)


def test_a_plain_request_gets_the_defaults():
    request = parse({"model": "tiny", "messages": USER})
    assert request.sampling == Sampling(30, 0.0, 1.0, None) and not request.max_tokens_given
    assert request.reading is None and request.steer == {} and request.guard is None
    assert not request.stream and request.positions == "all"
    request = parse({"messages": USER, "max_completion_tokens": 7, "temperature": 0.5,
                     "seed": 3, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    assert request.sampling == Sampling(7, 0.5, 1.0, 3) and request.max_tokens_given
    assert request.stream and request.include_usage
    assert parse({"prompt": ["once"]}, "completion").prompt == "once"


def test_message_parts_and_roles():
    request = parse({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})  # fmt: skip
    assert request.messages == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "ab"}]  # fmt: skip


def test_the_extension():
    request = parse({"messages": USER, "emolens": {
        "read": ["sad", "calm", "sad", "top:2"], "steer": {"calm": 0.1, "random:4": 0.05},
        "layers": 2, "positions": "response",
        "guard": {"when": "sad", "above": 0.5, "then": {"steer": {"calm": 0.1}}}}})  # fmt: skip
    assert request.reading == Reading(("sad", "calm"), (3, 0), 2)
    assert request.steer == {"calm": 0.1, "random:4": 0.05} and request.layers == [2]
    assert request.positions == "response" and request.guard.emotion == "sad"
    assert parse({"messages": USER, "emolens": {"read": "top:5"}}).reading == Reading((), (), 5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"[1, 2", 400, "not valid JSON"),
        ([1], 400, "must be a JSON object"),
        ({"model": "other", "messages": USER}, 404, "not served here"),
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": USER * 5}, 400, "too many messages: 5 (at most 4)"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "is not system, user or assistant"),
        ({"messages": [{"role": "user", "content": 3}]}, 400, "content must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text"),
        ({"messages": USER, "max_tokens": 0}, 400, "from 1 to 100"),
        ({"messages": USER, "max_tokens": True}, 400, "from 1 to 100"),
        ({"messages": USER, "top_p": 0}, 400, "above 0"),
        ({"messages": USER, "seed": "x"}, 400, "'seed' must be a whole number"),
        ({"messages": USER, "stream": "yes"}, 400, "'stream' must be true or false"),
        ({"messages": USER, "stop": ["\n"]}, 400, "'stop' is not supported"),
        ({"messages": USER, "tools": [{}]}, 400, "'tools' is not supported"),
        ({"messages": USER, "n": 3}, 400, "only n=1"),
        ({"prompt": ""}, 400, "one non-empty string"),
        ({"messages": USER, "emolens": []}, 400, "'emolens' must be an object"),
        ({"messages": USER, "emolens": {"model": "/tmp/x"}}, 400, "unknown field 'model'"),
        ({"messages": USER, "emolens": {"read": ["top:9"]}}, 400, "needs K from 1 to 5"),
        ({"messages": USER, "emolens": {"read": [3]}}, 400, "emotion names and"),
        ({"messages": USER, "emolens": {"steer": {"bored": 1}}}, 400, "unknown emotion 'bored'"),
        ({"messages": USER, "emolens": {"steer": [1]}}, 400, "must be an object"),
        ({"messages": USER, "emolens": {"layers": [7]}}, 400, "layer 7 is not in the bank"),
        ({"messages": USER, "emolens": {"layers": [True]}}, 400, "list of layer numbers"),
        ({"messages": USER, "emolens": {"positions": "some"}}, 400, "must be one of all"),
        ({"messages": USER, "emolens": {"guard": {"when": "calm"}}}, 400, "emolens.guard: "),
    ],
)
def test_bad_requests(body, status, message):
    kind = "completion" if isinstance(body, dict) and "prompt" in body else "chat"
    with pytest.raises(RequestError) as caught:
        parse(body, kind)
    assert caught.value.status == status and message in caught.value.message
    error = caught.value.body()["error"]
    assert error["message"] == caught.value.message and error["type"]


def test_chunks_look_like_openai():
    first = chunk("chat", "id", "m", 1, "Hi", None, first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert chunk("chat", "id", "m", 1, None, "stop")["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}  # fmt: skip
    assert chunk("completion", "id", "m", 1, "x", None)["choices"][0]["text"] == "x"


def test_lens_scores_means_and_map():
    scale = torch.tensor([1.0, 2.0, 4.0, 1.0, 1.0])
    lens = Lens(BANK, 2, "denoised", scale)
    states = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    projections = lens.project(states)
    assert torch.allclose(projections, states @ BANK.matrix(2).T, atol=1e-5)
    reading = Reading(("happy",), (2,), 2)
    token = lens.token(projections[0], reading)
    assert token["scores"]["happy"] == pytest.approx(float(projections[0, 2]), abs=1e-5)
    assert token["scaled"]["happy"] == pytest.approx(
        max(-1.0, min(1.0, float(projections[0, 2]) / 4)), abs=1e-5
    )
    assert [name for name, _, _ in token["top"]] == [
        EMOTIONS[i] for i in projections[0].topk(2).indices.tolist()
    ]
    summary = lens.summary(projections.sum(0), 3, reading)
    assert summary["means"]["happy"] == pytest.approx(float(projections[:, 2].mean()), abs=1e-5)
    assert summary["count"] == 3 and len(summary["map"]) == 2
    assert set(lens.map) == set(EMOTIONS)
    assert max(abs(v) for point in lens.map.values() for v in point) == pytest.approx(1.0)
    only_calm = torch.tensor([0.9, -1.0, -1.0, -1.0, -1.0])
    assert lens.position(only_calm) == pytest.approx(lens.map["calm"], abs=1e-5)
    assert lens.position(-torch.ones(5)) == [0.0, 0.0]
