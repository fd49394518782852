"""Where chat replies come from, for the jobs that ask a model for text in bulk (corpus
generation): a `Backend` is anything with a `name` and a `complete` method; `LocalBackend`
decodes in-process through emolens' one decoding loop, `OpenAIBackend` asks an
OpenAI-compatible server with bounded concurrency, retries and timeouts."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, cast

from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.models import LoadedModel


class Backend(Protocol):
    """A chat model that answers batches of prompts; `name` becomes each story's `source`."""

    name: str

    def complete(
        self,
        prompts: list[list[dict]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> list[str]:
        """One reply per chat (a list of {"role", "content"} messages), in order."""
        ...


class LocalBackend:
    """A loaded model generating in-process, a batch of prompts at a time, through emolens'
    one decoding loop."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.name = lm.name

    def complete(
        self,
        prompts: list[list[dict]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> list[str]:
        """Sampled replies (greedy at temperature 0); row i is seeded with `seed + i`."""
        from emolens.generation import Sampling, decode

        samplings = [
            Sampling(max_new_tokens, temperature, seed=None if seed is None else seed + i)
            for i in range(len(prompts))
        ]
        ids = [self.lm.encode_chat(messages, add_generation_prompt=True) for messages in prompts]
        return [generation.text for generation in decode(self.lm, ids, samplings)]


class OpenAIBackend:
    """A chat model behind an OpenAI-compatible endpoint (vLLM, llama.cpp, `emolens serve`, a
    hosted API): the prompts of a batch go out `concurrency` at a time; a request that times
    out, is rate-limited or meets a server error is retried `retries` times, waiting
    `backoff` seconds, then twice as long, and so on."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        try:
            import openai
        except ImportError:
            raise EmolensError(
                "--backend openai needs the openai client: pip install 'emolens[openai]'"
            ) from None
        for name, value, least in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if value < least:
                raise EmolensError(f"{name} must be at least {least}, got {value}")
        if not timeout > 0 or backoff < 0:
            raise EmolensError(f"timeout must be positive and backoff at least 0, got "
                               f"{timeout} and {backoff}")  # fmt: skip
        self.name, self.base_url = model, base_url
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers need none
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.transient = (
            openai.APIConnectionError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        self.refused = openai.APIStatusError

    def complete(
        self,
        prompts: list[list[dict]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> list[str]:
        """One reply per chat, in order; request i is seeded with `seed + i`."""
        pool = ThreadPoolExecutor(min(self.concurrency, len(prompts)))
        try:
            futures = [pool.submit(self._ask, messages, max_new_tokens, temperature,
                                   None if seed is None else seed + i)
                       for i, messages in enumerate(prompts)]  # fmt: skip
            return [future.result() for future in futures]
        finally:  # after an error, requests not yet sent are dropped
            pool.shutdown(cancel_futures=True)

    def _ask(
        self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int | None
    ) -> str:
        attempt = 0
        while True:
            try:
                response = self.client.chat.completions.create(
                    model=self.name,
                    messages=cast(Any, messages),  # plain {"role", "content"} dicts
                    max_tokens=max_new_tokens,
                    temperature=temperature,
                    extra_body={"seed": seed} if seed is not None else None,
                )
                return response.choices[0].message.content or ""
            except self.transient as error:  # timeouts are connection errors too
                if attempt == self.retries:
                    raise EmolensError(f"{self.base_url}: {error} ({attempt + 1} tries)") from None
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
            except self.refused as error:  # a bad request, key or model name: retrying won't help
                raise EmolensError(f"{self.base_url}: {error}") from None
