"""Load: 16 concurrent streaming clients with bounded request loops against one server. All
complete, rows join and leave the running batch, no reply mixes rows, and every readout equals
a single-request run within 1e-4."""

from __future__ import annotations

import threading

import pytest

from .test_serve import client, health, server, tiny_files  # noqa: F401 (fixtures)

CLIENTS = 16
LOOPS = 2
PROMPTS = [
    "Tell me a story.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "List three colours.",
    "Why is the sky blue?",
    "Describe a quiet morning.",
    "How do bees make honey?",
    "Say something kind.",
]
READ = {"read": ["calm", "sad", "top:2"]}


def _stream(api, model: str, prompt: str, max_tokens: int) -> tuple[str, list[dict], dict]:
    chunks = list(api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        stream=True, extra_body={"emolens": READ},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    tokens = [c.model_extra["emolens"] for c in chunks[:-1]]
    return text, tokens, chunks[-1].model_extra["emolens"]


def test_sixteen_concurrent_streaming_clients(server):  # noqa: F811
    api = client(server)
    model = health(server)["model"]
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 5 * i) for i in range(CLIENTS)]
    alone = {job: _stream(api, model, *job) for job in set(jobs)}  # one request at a time
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def work(i: int) -> None:
        mine = client(server)
        try:
            start.wait()
            for loop in range(LOOPS):
                results[i, loop] = _stream(mine, model, *jobs[i])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors[0]
    assert len(results) == CLIENTS * LOOPS  # all complete
    assert health(server)["peak_batch"] >= CLIENTS // 2  # they really were decoded together
    for (i, _), (text, tokens, final) in results.items():
        text_alone, tokens_alone, final_alone = alone[jobs[i]]
        assert text == text_alone  # no reply mixes rows
        assert [t["index"] for t in tokens] == list(range(len(tokens_alone)))
        for token, reference in zip(tokens, tokens_alone, strict=True):
            for name, value in reference["scores"].items():
                assert token["scores"][name] == pytest.approx(value, abs=1e-4)
            assert [name for name, *_ in token["top"]] == [name for name, *_ in reference["top"]]
        assert final["means"] == pytest.approx(final_alone["means"], abs=1e-4)
    assert health(server)["active"] == 0
