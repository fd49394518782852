"""The judge: something that turns a rubric prompt into a text answer, plus a per-run cache.

Two judges ship: `OpenAIJudge` talks to any OpenAI-compatible chat endpoint (vLLM, llama.cpp,
a hosted API; needs the optional `openai` package) and `CallableJudge` wraps any
``complete(messages) -> str`` (a local model plugged in through emolens' generation loop).
`CachedJudge` wraps either and records every answer in an append-only JSONL file keyed by
(model, prompt), so a re-run never asks the same question twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from emolens.atomic import atomic_path
from emolens.errors import EmolensError
from emolens.experiments.rubrics import Rubric

Messages = list[dict[str, str]]


class Judge(Protocol):
    """Answers one prompt; `name` identifies the model behind it (part of the cache key)."""

    name: str

    def ask(self, prompt: str) -> str: ...


@dataclass(frozen=True)
class Verdict:
    """A judge's answer to a rubric prompt and what it parsed to (None: unparsable)."""

    rubric: str
    value: str | int | None
    answer: str

    @property
    def parsed(self) -> bool:
        return self.value is not None


def ask_rubric(judge: Judge, rubric: Rubric, prompt: str) -> Verdict:
    """Ask `judge` a prompt built from `rubric` and parse its answer."""
    answer = judge.ask(prompt)
    return Verdict(rubric.name, rubric.parse(answer), answer)


def ask_many(judge: Judge, prompts: Iterable[str], *, workers: int = 4) -> list[str]:
    """Answers to several prompts, in order, asking up to `workers` at a time."""
    prompts = list(prompts)
    if workers <= 1 or len(prompts) <= 1:
        return [judge.ask(prompt) for prompt in prompts]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(judge.ask, prompts))


def user_message(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


class CallableJudge:
    """A judge backed by any function from chat messages to a reply."""

    def __init__(self, complete: Callable[[Messages], str], name: str) -> None:
        self.complete = complete
        self.name = name

    def ask(self, prompt: str) -> str:
        return self.complete(user_message(prompt))


class OpenAIJudge:
    """A judge on an OpenAI-compatible chat-completions endpoint (`url` ends in /v1).

    Failed requests (connection errors, timeouts, 408/409/429/5xx) are retried up to
    `max_retries` times with exponential backoff and jitter by the `openai` client, which also
    honours a server's Retry-After header; each attempt is cut off after `timeout` seconds.
    Decoding is greedy (temperature 0) so a judgement is repeatable where the server allows.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_tokens: int = 1024,
        temperature: float = 0.0,
    ) -> None:
        try:
            import openai
        except ImportError:
            raise EmolensError(
                "the judge endpoint client needs the openai package: pip install 'emolens[openai]'"
            ) from None
        self._errors = openai.OpenAIError
        self.url = url
        self.name = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        # Local servers ignore the key but the client insists on one.
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "unused"
        self.client = openai.OpenAI(
            base_url=url, api_key=key, timeout=timeout, max_retries=max_retries
        )

    def ask(self, prompt: str) -> str:
        try:
            response = self.client.chat.completions.create(
                model=self.name,
                messages=user_message(prompt),  # type: ignore[arg-type]
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except self._errors as error:
            raise EmolensError(f"judge {self.name!r} at {self.url}: {error}") from None
        if not response.choices:
            raise EmolensError(f"judge {self.name!r} at {self.url}: reply has no choices")
        return response.choices[0].message.content or ""


def cache_key(model: str, prompt: str) -> str:
    """A stable key for one (model, prompt) question."""
    return hashlib.sha256(json.dumps([model, prompt]).encode("utf-8")).hexdigest()


class CachedJudge:
    """A judge whose answers are kept in an append-only JSONL file (one run's cache).

    Each answer is written as one whole line ({"key", "model", "answer"}), flushed and fsynced
    before it is returned. A partial last line left by a crash is dropped (the file is
    rewritten atomically without it); any other bad line is an error naming file and line.
    Errors from the wrapped judge are not cached. Safe to share between threads.
    """

    def __init__(self, judge: Judge, path: str | os.PathLike) -> None:
        self.judge = judge
        self.name = judge.name
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._answers = self._load()

    def __len__(self) -> int:
        return len(self._answers)

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")  # not splitlines: answers may hold U+2028 and friends
        answers: dict[str, str] = {}
        kept: list[str] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                answers[row["key"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):  # the unterminated last line a crash left
                    break
                raise EmolensError(
                    f"{self.path}:{number}: not a judge cache line (key and answer)"
                ) from None
            kept.append(line)
        if text and not text.endswith("\n"):
            with atomic_path(self.path) as staging:
                staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return answers

    def ask(self, prompt: str) -> str:
        key = cache_key(self.name, prompt)
        with self._lock:
            if key in self._answers:
                self.hits += 1
                return self._answers[key]
        answer = self.judge.ask(prompt)
        row = {"key": key, "model": self.name, "answer": answer}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if key not in self._answers:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("ab") as handle:  # one write call per whole line
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._answers[key] = answer
            self.misses += 1
        return answer


def open_judge(
    url: str, model: str, *, cache: str | os.PathLike | None = None, **options: Any
) -> Judge:
    """The judge behind ``--judge-url URL --judge-model NAME``, cached in `cache` if given;
    `options` go to `OpenAIJudge` (api_key, timeout, max_retries, max_tokens, temperature)."""
    endpoint = OpenAIJudge(url, model, **options)
    return CachedJudge(endpoint, cache) if cache is not None else endpoint


def local_judge(
    spec: str, *, max_new_tokens: int = 512, device: str | None = None
) -> CallableJudge:
    """A judge on any model emolens loads (a local directory, a .gguf file, a hub id, or
    "embedded" for the shipped SmolLM2), answering greedily through emolens' decoding loop.
    Its name is the model's name and weights digest, so a cache never mixes two models."""
    from emolens.generation import Sampling, decode
    from emolens.models import load_model

    lm = load_model(None if spec == "embedded" else spec, device=device)
    sampling = Sampling(max_new_tokens=max_new_tokens)

    def complete(messages: Messages) -> str:
        prompt = lm.encode_chat(messages, add_generation_prompt=True)
        return decode(lm, [prompt], sampling)[0].text

    return CallableJudge(complete, f"{lm.name}@{lm.fingerprint['weights']}")


def check_judge_options(spec: str | None, url: str | None, model: str | None) -> None:
    """Refuse a half-given or doubly-given judge before any work is done."""
    if spec is not None and url is not None:
        raise EmolensError("give --judge SPEC or --judge-url URL --judge-model NAME, not both")
    if (url is None) != (model is None):
        raise EmolensError("--judge-url and --judge-model go together")


def make_judge(
    spec: str | None = None,
    *,
    url: str | None = None,
    model: str | None = None,
    cache: str | os.PathLike | None = None,
    max_tokens: int = 512,
    device: str | None = None,
) -> Judge | None:
    """The judge of ``--judge SPEC`` (a local model) or ``--judge-url URL --judge-model NAME``
    (an endpoint), cached in `cache` when given; None when neither is given."""
    check_judge_options(spec, url, model)
    if spec is not None:
        judge: Judge = local_judge(spec, max_new_tokens=max_tokens, device=device)
    elif url is not None and model is not None:
        judge = OpenAIJudge(url, model, max_tokens=max_tokens)
    else:
        return None
    return CachedJudge(judge, cache) if cache is not None else judge
