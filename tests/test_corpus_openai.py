"""`emolens corpus generate --backend openai`: a stub OpenAI-compatible server on a free
localhost port (canned stories; it can fail requests and count how many are in flight), and
`emolens serve` on the embedded model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emolens.backends import OpenAIBackend
from emolens.cli import main
from emolens.corpus_generation import generate, prompt
from emolens.errors import EmolensError
from tests.test_corpus_generation import story

EMOTIONS = "afraid,calm"
TOPICS = "0,1,2,3"


class Stub:
    """What the stub server saw and how it behaves: `fail` first requests get `status`."""

    def __init__(self, fail: int = 0, status: int = 500, delay: float = 0.0) -> None:
        self.fail, self.status, self.delay = fail, status, delay
        self.requests: list[dict] = []
        self.running = self.peak = 0
        self.lock = threading.Lock()


def reply_to(body: dict) -> str:
    """Numbered stories, distinct per prompt and seed, as many as the prompt asks for."""
    text = body["messages"][-1]["content"]
    count = int(text.split()[1]) if text.split()[1].isdigit() else 1
    base = int(hashlib.sha256(f"{text}|{body.get('seed')}".encode()).hexdigest()[:8], 16)
    return "\n\n".join(f"{i}. {story(base + i)}" for i in range(1, count + 1))


@contextmanager
def stub_server(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append(body)
                failing = len(stub.requests) <= stub.fail
                stub.running += 1
                stub.peak = max(stub.peak, stub.running)
            time.sleep(stub.delay)
            with stub.lock:
                stub.running -= 1
            if failing:
                payload = {"error": {"message": "try again", "type": "server_error"}}
                status = stub.status
            else:
                status = 200
                message = {"role": "assistant", "content": reply_to(body)}
                payload = {"id": "c", "object": "chat.completion", "created": 0,
                           "model": body["model"], "choices": [{"index": 0, "message": message,
                           "finish_reason": "stop"}]}  # fmt: skip
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def command(url: str, out, *extra: str) -> list[str]:
    return ["corpus", "generate", "--backend", "openai", "--base-url", url, "--model",
            "stub-writer", "--out", str(out), "--emotions", EMOTIONS, "--topics", TOPICS,
            "--per-topic", "3", *extra]  # fmt: skip


def test_generation_over_http_retries_bounds_concurrency_and_resumes(tmp_path, capsys):
    stub = Stub(fail=1, delay=0.2)
    out = tmp_path / "gen.jsonl"
    with stub_server(stub) as url:
        assert main(command(url, out, "--concurrency", "3")) == 0
        assert len(stub.requests) == 8 + 1  # 2 emotions x 4 topics, one retried
        assert stub.peak == 3
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 8 * 3 and {r["source"] for r in records} == {"stub-writer"}
        assert len((tmp_path / "gen.jsonl.done").read_text().splitlines()) == 8
        first = stub.requests[1]
        assert first["model"] == "stub-writer" and first["max_tokens"] == 600
        assert first["messages"] == prompt("afraid", first["messages"][0]["content"].split(
            " about ")[1].split(". In")[0], 3)  # fmt: skip
        assert sorted(r["seed"] for r in stub.requests[1:]) == list(range(8))
        # a re-run finds every pair done: no request, the same file
        before = out.read_text()
        assert main(command(url, out, "--concurrency", "3")) == 0
        assert len(stub.requests) == 9 and out.read_text() == before
    assert "kept: 24" in capsys.readouterr().out


def test_an_interrupted_run_completes_to_the_stories_of_an_unbroken_one(tmp_path):
    """Resumable output as with the local backend: the same seeds, the same records."""
    stub = Stub()
    with stub_server(stub) as url:
        backend = OpenAIBackend("stub-writer", base_url=url, concurrency=4)
        options = dict(emotions=EMOTIONS, topics=TOPICS, per_topic=3, progress=False,
                       batch_size=2)  # fmt: skip
        generate(backend, tmp_path / "whole.jsonl", **options)

        class Crash(Exception):
            pass

        def crash_on_third(prompts, **sampling):
            if len(stub.requests) >= 8 + 4:  # the unbroken run, then two batches of two
                raise Crash
            return OpenAIBackend.complete(backend, prompts, **sampling)

        backend.complete = crash_on_third
        with pytest.raises(Crash):
            generate(backend, tmp_path / "part.jsonl", **options)
        del backend.complete
        generate(backend, tmp_path / "part.jsonl", **options)
    assert len(stub.requests) == 8 + 8
    whole = (tmp_path / "whole.jsonl").read_text()
    assert (tmp_path / "part.jsonl").read_text() == whole


def test_errors_are_clear_and_only_transient_ones_retried(tmp_path, capsys):
    refused = Stub(fail=10, status=404)
    with stub_server(refused) as url:
        assert main(command(url, tmp_path / "a.jsonl", "--concurrency", "1")) == 2
        seeds = [r["seed"] for r in refused.requests]
        assert len(set(seeds)) == len(seeds) < 4  # a 404 is not retried; the batch stops
    assert "404" in capsys.readouterr().err
    busy = Stub(fail=10, status=503)
    with stub_server(busy) as url:
        backend = OpenAIBackend("stub-writer", base_url=url, retries=2, backoff=0.01)
        with pytest.raises(EmolensError, match="3 tries"):
            backend.complete([[{"role": "user", "content": "Write one story"}]],
                             max_new_tokens=8, temperature=0)  # fmt: skip
        assert len(busy.requests) == 3
    slow = Stub(delay=1.0)
    with stub_server(slow) as url:
        backend = OpenAIBackend("stub-writer", base_url=url, timeout=0.2, retries=1, backoff=0)
        with pytest.raises(EmolensError, match="timed out.*2 tries"):
            backend.complete([[{"role": "user", "content": "Write one story"}]],
                             max_new_tokens=8, temperature=0)  # fmt: skip
        assert len(slow.requests) == 2
    assert main(command("http://127.0.0.1:9/v1", tmp_path / "b.jsonl", "--retries", "0")) == 2
    assert "Connection error" in capsys.readouterr().err
    assert main(["corpus", "generate", "--backend", "openai", "--out", str(tmp_path / "c")]) == 2
    assert "--base-url URL and --model NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_generation_from_emolens_serve_on_the_embedded_model(embedded, tmp_path):
    from emolens.bank import random_bank
    from tests.test_serve import running_server

    bank = random_bank(["calm", "afraid"], [embedded.default_layer()], embedded.width, norm=170.0)
    bank.default_layer, bank.model = embedded.default_layer(), dict(embedded.fingerprint)
    bank_file = bank.save(tmp_path / "bank.safetensors")
    with running_server(["--bank", str(bank_file)], tmp_path / "server.log", timeout=600) as url:
        backend = OpenAIBackend(embedded.name, base_url=url + "/v1", concurrency=2)
        tally = generate(backend, tmp_path / "gen.jsonl", emotions="calm,afraid", topics="0",
                         per_topic=1, max_new_tokens=24, temperature=0, progress=False)  # fmt: skip
    # 24 tokens cannot finish a 60-word story: both replies arrive and are screened out
    assert tally.pairs == 2 and tally.parsed == 2
    assert len((tmp_path / "gen.jsonl.done").read_text().splitlines()) == 2
