"""`emolens serve` as a person uses it: a server subprocess on a free localhost port, driven by
the official `openai` client (and raw HTTP for what the client cannot send)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

import emolens
from emolens.bank import random_bank

from .conftest import save_for_cli, tiny_llama

EMOTIONS = ["calm", "desperate", "happy", "sad", "afraid", "angry"]
LAYER = 2
KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Tell me a story."}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 180):
    """`emolens serve ARGS` on a free port until the block ends; yields its base URL."""
    port = free_port()
    source = str(Path(emolens.__file__).parents[1])
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([source, environment.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "emolens.cli", "serve", *args, "--port", str(port)]
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environment
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"the server exited with {process.returncode}:\n{log.read_text()}"
                )
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return json.loads(response.read())


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """A tiny model directory and a random bank file: the CLI's --model/--bank arguments."""

    def make_bank(lm):
        bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, seed=3)
        bank.default_layer = LAYER
        return bank

    return save_for_cli(tmp_path_factory.mktemp("serve-tiny"), tiny_llama(), make_bank)[2]


@pytest.fixture(scope="session")
def server(tiny_files, tmp_path_factory):
    """An open server on the tiny model (greedy by default)."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server([*tiny_files, "--max-new-tokens", "24"], log) as url:
        yield url


@pytest.fixture(scope="module")
def locked(tiny_files, tmp_path_factory):
    """A server with an API key (from the environment) and small limits."""
    log = tmp_path_factory.mktemp("serve-locked") / "server.log"
    args = [*tiny_files, "--max-body", "3000", "--max-concurrent", "1", "--max-messages", "3",
            "--max-tokens", "400"]  # fmt: skip
    with running_server(args, log, env={"EMOLENS_API_KEY": KEY}) as url:
        yield url


def test_plain_openai_chat_and_completions(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == [health(server)["model"]]
    reply = api.chat.completions.create(model=health(server)["model"], messages=HELLO,
                                        max_tokens=6)  # fmt: skip
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert "emolens" not in (reply.model_extra or {})  # no extension: a plain server
    streamed = api.chat.completions.create(model=reply.model, messages=HELLO, max_tokens=6,
                                           stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same reply
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    completion = api.completions.create(model=reply.model, prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 5
    pieces = api.completions.create(model=reply.model, prompt="Once upon a time", max_tokens=5,
                                    stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in pieces) == completion.choices[0].text


def test_streamed_readout_and_means(server):
    api = client(server)
    stream = api.chat.completions.create(
        model=health(server)["model"], messages=HELLO, max_tokens=10, stream=True,
        extra_body={"emolens": {"read": ["calm", "desperate", "top:3"]}},
    )  # fmt: skip
    chunks = list(stream)
    tokens = [c.model_extra["emolens"] for c in chunks if c.choices[0].finish_reason is None]
    final = chunks[-1].model_extra["emolens"]
    assert [t["index"] for t in tokens] == list(range(len(tokens))) and len(tokens) == final[
        "count"
    ]
    for token in tokens:
        assert set(token["scores"]) == {"calm", "desperate"} and len(token["top"]) == 3
        assert all(-1 <= v <= 1 for v in token["scaled"].values())
        names = [name for name, _, _ in token["top"]]
        values = [value for _, value, _ in token["top"]]
        assert values == sorted(values, reverse=True) and set(names) <= set(EMOTIONS)
    for name in ("calm", "desperate"):
        mean = sum(t["scores"][name] for t in tokens) / len(tokens)
        assert final["means"][name] == pytest.approx(mean, abs=1e-4)
    assert final["layer"] == LAYER and len(final["map"]) == 2
    whole = api.chat.completions.create(model=health(server)["model"], messages=HELLO,
                                        max_tokens=10, extra_body={"emolens": {"read": "calm"}})  # fmt: skip
    extra = whole.model_extra["emolens"]
    assert extra["means"]["calm"] == pytest.approx(final["means"]["calm"], abs=1e-4)
    assert [t["scores"]["calm"] for t in extra["tokens"]] == pytest.approx(
        [t["scores"]["calm"] for t in tokens], abs=1e-4
    )


def test_steering_by_request_changes_the_reply(server):
    api = client(server)

    def calm(extension):
        reply = api.chat.completions.create(
            model=health(server)["model"], messages=HELLO, max_tokens=8,
            extra_body={"emolens": {"read": ["calm"], **extension}},
        )  # fmt: skip
        return [t["scores"]["calm"] for t in reply.model_extra["emolens"]["tokens"]]

    plain = calm({})
    assert calm({"steer": {"calm": 0.0001}}) == pytest.approx(plain, abs=1e-3)
    pushed = calm({"steer": {"calm": 1.0}, "layers": [LAYER], "positions": "all"})
    pulled = calm({"steer": {"calm": -1.0}, "layers": [LAYER]})
    assert sum(pushed) / len(pushed) > sum(plain) / len(plain) > sum(pulled) / len(pulled)


def test_guard_fires_in_the_stream(server):
    api = client(server)
    model = health(server)["model"]

    def run(guard):
        chunks = list(api.chat.completions.create(
            model=model, messages=HELLO, max_tokens=20, stream=True,
            extra_body={"emolens": {"read": ["calm"], "guard": guard}},
        ))  # fmt: skip
        return chunks, [c.model_extra["emolens"] for c in chunks]

    # a crafted rule that always fires: any reading is above -1000
    chunks, extras = run({"when": "calm", "above": -1000, "window": 3, "then": "stop"})
    events = [e["guard"] for e in extras if "guard" in e]
    assert len(events) == 1 and events[0]["index"] == 2 and events[0]["action"] == "stop"
    assert isinstance(events[0]["reading"], float)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert extras[-1]["count"] == 3 and extras[-1]["fired"] == events
    # steer first, then stop when it fires again over a fresh window
    rule = {"when": "calm", "above": -1000, "window": 4, "then": {"steer": {"calm": 1.0}},
            "or": "stop"}  # fmt: skip
    chunks, extras = run(rule)
    events = [e["guard"] for e in extras if "guard" in e]
    assert [(e["index"], e["action"]) for e in events] == [(3, "steer"), (7, "stop")]
    steered = [e["scores"]["calm"] for e in extras if "scores" in e]
    _, unguarded = run({"when": "calm", "below": -1000, "window": 4})  # never fires
    plain = [e["scores"]["calm"] for e in unguarded if "scores" in e]
    assert steered[:4] == pytest.approx(plain[:4], abs=1e-4)  # the same until it fired
    assert steered[5:8] != pytest.approx(plain[5:8], abs=1e-3)  # steered afterwards


def test_bad_requests_get_clear_errors(server):
    api = client(server)
    model = health(server)["model"]

    def refused(error_type, **options):
        with pytest.raises(error_type) as caught:
            api.chat.completions.create(model=options.pop("model", model), **{
                "messages": HELLO, "max_tokens": 4, **options})  # fmt: skip
        return (
            caught.value.body["message"]
            if isinstance(caught.value.body, dict)
            else str(caught.value)
        )

    message = refused(openai.BadRequestError, extra_body={"emolens": {"read": ["bored"]}})
    assert "unknown emotion 'bored'" in message
    message = refused(openai.BadRequestError, extra_body={"emolens": {"steer": {"calm": 3}}})
    assert "outside -1...1" in message
    message = refused(openai.BadRequestError, extra_body={"emolens": {"bank": "/etc/passwd"}})
    assert "unknown field 'bank'" in message
    message = refused(openai.BadRequestError, extra_body={"emolens": {"layers": [99]}})
    assert "layer 99 is not in the bank" in message
    message = refused(openai.BadRequestError,
                      extra_body={"emolens": {"guard": {"when": "calm", "above": 1, "window": 0}}})  # fmt: skip
    assert "'window' must be a whole number from 1" in message
    assert "not served here" in refused(openai.NotFoundError, model="/etc/passwd")
    assert "only n=1" in refused(openai.BadRequestError, n=2)
    assert "'max_tokens' must be" in refused(openai.BadRequestError, max_tokens=10**6)
    assert "'temperature'" in refused(openai.BadRequestError, temperature=-1)
    assert "exceeds the context" in refused(openai.BadRequestError, max_tokens=1000)
    assert "role 'robot'" in refused(
        openai.BadRequestError, messages=[{"role": "robot", "content": "x"}]
    )
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json",
                       {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["message"]
    assert health(server)["status"] == "ok"  # still serving


def test_a_client_leaving_mid_stream_removes_its_row(server):
    host, port = server.removeprefix("http://").split(":")
    whole = client(server).chat.completions.create(model=health(server)["model"], messages=HELLO,
                                                   max_tokens=400)  # fmt: skip
    assert whole.usage.completion_tokens == 400  # left alone, this reply runs 400 steps
    before = health(server)["steps"]
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": health(server)["model"], "messages": HELLO, "max_tokens": 400, "stream": True,
            "emolens": {"read": "top:2"}}  # fmt: skip
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first token arrived
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while health(server)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    state = health(server)
    assert state["active"] == 0 and state["steps"] - before < 300  # it left early
    reply = client(server).chat.completions.create(model=state["model"], messages=HELLO,
                                                   max_tokens=3)  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_api_key_and_limits(locked):
    model = health(locked)["model"]
    assert health(locked)["auth"] is True  # /health is open; the API is not
    with pytest.raises(openai.AuthenticationError):
        client(locked, "wrong").models.list()
    status, body = raw(locked, "GET", "/emolens/bank")
    assert status == 401 and "API key" in body["error"]["message"]
    api = client(locked, KEY)
    assert api.models.list().data[0].id == model
    with urllib.request.urlopen(locked + "/") as page:  # the page itself is public
        assert page.status == 200 and b"emolens" in page.read()
    big = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * 5000}]})
    status, body = raw(locked, "POST", "/v1/chat/completions", big.encode(),
                       {"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert status == 413 and "over 3000 bytes" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="too many messages"):
        api.chat.completions.create(model=model, messages=HELLO * 4, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="from 1 to 400"):
        api.chat.completions.create(model=model, messages=HELLO, max_tokens=401)
    # one request at a time: a second one while the first streams gets 429
    first = api.chat.completions.create(model=model, messages=HELLO, max_tokens=400, stream=True)
    next(iter(first))
    with pytest.raises(openai.RateLimitError, match="too many concurrent requests"):
        api.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    first.close()
    deadline = time.monotonic() + 20
    while health(locked)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.chat.completions.create(model=model, messages=HELLO, max_tokens=2).choices
