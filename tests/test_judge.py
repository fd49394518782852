"""The judge: fake and callable judges, the JSONL cache, and the OpenAI-compatible client
against a stub chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emolens.errors import EmolensError
from emolens.experiments.judge import (
    CachedJudge,
    CallableJudge,
    OpenAIJudge,
    ask_many,
    ask_rubric,
    cache_key,
    open_judge,
)
from emolens.experiments.rubrics import load_rubric


class FakeJudge:
    """Answers from a script and counts the questions."""

    def __init__(self, answer="VERDICT: refuse", name="fake"):
        self.answer = answer
        self.name = name
        self.prompts = []

    def ask(self, prompt):
        self.prompts.append(prompt)
        return self.answer(prompt) if callable(self.answer) else self.answer


def test_ask_rubric_parses_or_reports_unparsable():
    rubric = load_rubric("blackmail")
    good = ask_rubric(FakeJudge("Because...\nVERDICT: blackmail"), rubric, "prompt")
    assert good.value == "blackmail" and good.parsed and good.rubric == "blackmail"
    bad = ask_rubric(FakeJudge("I cannot decide."), rubric, "prompt")
    assert bad.value is None and not bad.parsed and bad.answer == "I cannot decide."


def test_callable_judge_sends_one_user_message():
    seen = []
    judge = CallableJudge(lambda messages: seen.append(messages) or "SCORE: 1", name="local")
    assert judge.ask("hello") == "SCORE: 1"
    assert seen == [[{"role": "user", "content": "hello"}]]


def test_ask_many_keeps_order_with_threads():
    judge = FakeJudge(lambda prompt: prompt.upper())
    assert ask_many(judge, ["a", "b", "c", "d"], workers=3) == ["A", "B", "C", "D"]
    assert ask_many(judge, ["e"], workers=1) == ["E"]


def test_cache_answers_repeat_questions_from_disk(tmp_path):
    path = tmp_path / "run" / "judge.jsonl"
    inner = FakeJudge(lambda prompt: f"answer to {prompt}")
    cached = CachedJudge(inner, path)
    assert cached.ask("q1") == "answer to q1"
    assert cached.ask("q\u2028x") == "answer to q\u2028x"  # a line separator inside an answer
    assert cached.ask("q1") == "answer to q1"
    assert (cached.hits, cached.misses, len(inner.prompts)) == (1, 2, 2)
    line = json.loads(path.read_text().splitlines()[0])
    assert line == {"key": cache_key("fake", "q1"), "model": "fake", "answer": "answer to q1"}

    again = CachedJudge(FakeJudge("should not be asked"), path)  # a re-run
    assert again.ask("q1") == "answer to q1" and again.ask("q\u2028x") == "answer to q\u2028x"
    assert again.hits == 2
    other_model = CachedJudge(FakeJudge("fresh", name="other"), path)
    assert other_model.ask("q1") == "fresh"  # the key includes the model
    assert len(path.read_text().split("\n")) == 4  # three lines and the final newline


def test_cache_drops_a_partial_last_line_and_rejects_corruption(tmp_path):
    path = tmp_path / "judge.jsonl"
    whole = json.dumps({"key": cache_key("fake", "q"), "model": "fake", "answer": "A"})
    path.write_text(whole + "\n" + '{"key": "abc", "ans', encoding="utf-8")
    cached = CachedJudge(FakeJudge("B"), path)
    assert len(cached) == 1 and path.read_text() == whole + "\n"
    cached.ask("new")
    assert [json.loads(line)["answer"] for line in path.read_text().splitlines()] == ["A", "B"]

    path.write_text("not json\n" + whole + "\n", encoding="utf-8")
    with pytest.raises(EmolensError, match=r"judge\.jsonl:1"):
        CachedJudge(FakeJudge(), path)


def test_judge_errors_are_not_cached(tmp_path):
    def failing(prompt):
        raise EmolensError("endpoint down")

    cached = CachedJudge(FakeJudge(failing), tmp_path / "c.jsonl")
    with pytest.raises(EmolensError, match="endpoint down"):
        cached.ask("q")
    assert len(cached) == 0 and not (tmp_path / "c.jsonl").exists()


# --- the OpenAI-compatible client against a stub server ---------------------------------------


class StubServer:
    """A chat-completions endpoint that plays a script of (status, delay, content) replies."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                stub.requests.append((self.path, json.loads(self.rfile.read(length))))
                status, delay, content = stub.script.pop(0) if stub.script else (200, 0, "SCORE: 0")
                time.sleep(delay)
                if status == 200:
                    body = {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "stub",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                else:
                    body = {"error": {"message": content, "type": "server_error"}}
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "10")  # keeps client backoff short
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_openai_judge_asks_the_endpoint():
    with StubServer([(200, 0, "Fine.\nSCORE: 2")]) as stub:
        judge = OpenAIJudge(stub.url, "judge-model", api_key="test", max_retries=0)
        assert judge.ask("Rate this.") == "Fine.\nSCORE: 2"
    path, request = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert request["model"] == "judge-model"
    assert request["messages"] == [{"role": "user", "content": "Rate this."}]
    assert request["temperature"] == 0.0


def test_openai_judge_retries_after_a_server_error():
    with StubServer([(500, 0, "overloaded"), (200, 0, "VERDICT: other")]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key="test", max_retries=2)
        assert judge.ask("q") == "VERDICT: other"
    assert len(stub.requests) == 2


def test_openai_judge_gives_up_with_a_clear_error():
    with StubServer([(500, 0, "down")] * 3) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key="test", max_retries=1)
        with pytest.raises(EmolensError, match=r"judge 'm' at http://127\.0\.0\.1"):
            judge.ask("q")
    assert len(stub.requests) == 2


def test_openai_judge_times_out_then_retries():
    with StubServer([(200, 1.0, "late"), (200, 0, "SCORE: 1")]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key="test", timeout=0.3, max_retries=1)
        started = time.monotonic()
        assert judge.ask("q") == "SCORE: 1"
        assert time.monotonic() - started < 3
    assert len(stub.requests) == 2


def test_openai_judge_timeout_without_retries_raises():
    with StubServer([(200, 1.0, "late")]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key="test", timeout=0.3, max_retries=0)
        with pytest.raises(EmolensError, match="timed out|Timeout"):
            judge.ask("q")


def test_cached_endpoint_is_not_asked_twice_on_a_rerun(tmp_path):
    cache = tmp_path / "judge.jsonl"
    with StubServer([(200, 0, "VERDICT: blackmail")]) as stub:
        first = open_judge(stub.url, "m", cache=cache, api_key="test", max_retries=0)
        assert first.ask("same prompt") == "VERDICT: blackmail"
        rerun = open_judge(stub.url, "m", cache=cache, api_key="test", max_retries=0)
        assert rerun.ask("same prompt") == "VERDICT: blackmail"
    assert len(stub.requests) == 1
    assert isinstance(open_judge("http://127.0.0.1:9/v1", "m", api_key="k"), OpenAIJudge)
