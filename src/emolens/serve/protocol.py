"""The OpenAI-compatible wire format: request bodies checked into `ParsedRequest`s, and the JSON of
responses and stream chunks. Pure functions; the bank is consulted for names and layers only.

A request may carry the emolens extension under "emolens" (the `openai` client sends it with
`extra_body`): `{"read": ["calm", "top:5"], "steer": {"calm": 0.05}, "layers": [20],
"positions": "response", "guard": {...}}`. Nothing in a request names a file.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from emolens.bank import EmotionBank
from emolens.errors import EmolensError
from emolens.generation import Sampling
from emolens.guard import Guard
from emolens.serve.lens import Reading
from emolens.steer import MODES, RANDOM_PREFIX

EXTENSION_KEYS = ("read", "steer", "layers", "positions", "guard")
# Fields whose non-default values this server cannot honour: refused rather than ignored.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}
ROLE_ALIASES = {"developer": "system"}


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a one-line message, the offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kinds = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}  # fmt: skip
        kind = kinds.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask, and on how many run at once."""

    max_tokens: int = 1024
    max_messages: int = 64
    max_body: int = 1_000_000
    max_concurrent: int = 32


@dataclass(frozen=True)
class Defaults:
    """What a request gets for fields it leaves out."""

    sampling: Sampling = Sampling(max_new_tokens=256)
    positions: str = "all"
    allow_strong: bool = False


@dataclass
class ParsedRequest:
    """A checked request: chat `messages` or a completion `prompt`, sampling, streaming, and
    the emolens extension (`steer` strengths at `layers` in `positions` mode)."""

    kind: str
    messages: list[dict] | None
    prompt: str | None
    sampling: Sampling
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    reading: Reading | None = None
    steer: dict[str, float] = field(default_factory=dict)
    layers: list[int] | None = None
    positions: str = "all"
    guard: Guard | None = None


def parse_request(
    raw: bytes,
    kind: str,
    model: str,
    bank: EmotionBank,
    limits: Limits,
    defaults: Defaults,
) -> ParsedRequest:
    """Check a request body for "chat" or "completion"; raises RequestError."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    asked = body.get("model")
    if asked is not None and asked != model:
        raise RequestError(
            404, f"model {str(asked)[:100]!r} is not served here; this server serves {model!r}",
            "model", "model_not_found",
        )  # fmt: skip
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(400, f"'{name}' is not supported by emolens serve", name)
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(options.get("include_usage", False))
    messages = prompt = None
    if kind == "chat":
        messages = _messages(body.get("messages"), limits)
    else:
        prompt = _prompt(body.get("prompt"))
    sampling, given = _sampling(body, limits, defaults)
    request = ParsedRequest(kind, messages, prompt, sampling, given, stream, include_usage,
                      positions=defaults.positions)  # fmt: skip
    extension = body.get("emolens")
    if extension is not None:
        _extension(request, extension, bank, defaults)
    return request


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false", name)
    return value


def _messages(messages: object, limits: Limits) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(
            400, f"too many messages: {len(messages)} (at most {limits.max_messages})", "messages"
        )
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with role and content", where)
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                400, f"{where}.role {message.get('role')!r} is not system, user or assistant",
                f"{where}.role",
            )  # fmt: skip
        checked.append({"role": role, "content": _content(message.get("content"), where)})
    return checked


def _content(content: object, where: str) -> str:
    """Message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(400, f"{where}.content: only text parts are supported", where)
            if not isinstance(part.get("text"), str):
                raise RequestError(400, f"{where}.content: a text part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"{where}.content must be a string", f"{where}.content")


def _prompt(prompt: object) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be one non-empty string", "prompt")
    return prompt


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise RequestError(400, f"'{name}' must be a number from {low:g} to {high:g}", name)
    return float(value)


def _sampling(body: dict, limits: Limits, defaults: Defaults) -> tuple[Sampling, bool]:
    base = defaults.sampling
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    tokens = body.get(name)
    given = tokens is not None
    if given and (
        isinstance(tokens, bool)
        or not isinstance(tokens, int)
        or not 1 <= tokens <= limits.max_tokens
    ):
        raise RequestError(
            400, f"'{name}' must be a whole number from 1 to {limits.max_tokens}", name
        )
    seed = body.get("seed", base.seed)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be a whole number", "seed")
    temperature = _number(body, "temperature", 0.0, 2.0, base.temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, base.top_p)
    if top_p == 0:
        raise RequestError(400, "'top_p' must be above 0", "top_p")
    count = tokens if isinstance(tokens, int) else min(base.max_new_tokens, limits.max_tokens)
    return Sampling(count, temperature, top_p, seed), given


def _extension(
    request: ParsedRequest, extension: object, bank: EmotionBank, defaults: Defaults
) -> None:
    if not isinstance(extension, dict):
        raise RequestError(400, "'emolens' must be an object", "emolens")
    unknown = [key for key in extension if key not in EXTENSION_KEYS]
    if unknown:
        raise RequestError(
            400, f"emolens: unknown field {unknown[0]!r}; allowed: {', '.join(EXTENSION_KEYS)}",
            f"emolens.{unknown[0]}",
        )  # fmt: skip
    if extension.get("read") is not None:
        request.reading = _reading(extension["read"], bank.emotions)
    if extension.get("steer"):
        request.steer = _strengths(extension["steer"], bank)
    if extension.get("layers") is not None:
        request.layers = _layers(extension["layers"], bank)
    positions = extension.get("positions", request.positions)
    if positions not in MODES:
        raise RequestError(
            400, f"emolens.positions must be one of {', '.join(MODES)}", "emolens.positions"
        )
    request.positions = positions
    if extension.get("guard") is not None:
        try:
            request.guard = Guard.parse(extension["guard"], bank.emotions, defaults.allow_strong)
        except EmolensError as error:
            raise RequestError(400, f"emolens.{error}", "emolens.guard") from None


def _reading(spec: object, emotions: list[str]) -> Reading:
    """Named emotions and "top:K" in a list (or one of them as a string)."""
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise RequestError(
            400, 'emolens.read must be emotion names and "top:K", e.g. ["calm", "top:5"]',
            "emolens.read",
        )  # fmt: skip
    names: list[str] = []
    top = 0
    for item in items:
        if item.startswith("top:"):
            k = item[4:]
            if not k.isdigit() or not 1 <= int(k) <= len(emotions):
                raise RequestError(
                    400, f"emolens.read: {item!r} needs K from 1 to {len(emotions)}",
                    "emolens.read",
                )  # fmt: skip
            top = int(k)
        elif item not in emotions:
            raise RequestError(400, _unknown(item, "emolens.read", emotions), "emolens.read")
        elif item not in names:
            names.append(item)
    return Reading(tuple(names), tuple(emotions.index(n) for n in names), top)


def _strengths(spec: object, bank: EmotionBank) -> dict[str, float]:
    if not isinstance(spec, Mapping):
        raise RequestError(400, 'emolens.steer must be an object such as {"calm": 0.05}',
                           "emolens.steer")  # fmt: skip
    for name in spec:
        if not name.startswith(RANDOM_PREFIX) and name not in bank.emotions:
            raise RequestError(400, _unknown(name, "emolens.steer", bank.emotions),
                               "emolens.steer")  # fmt: skip
    return dict(spec)


def _layers(spec: object, bank: EmotionBank) -> list[int]:
    layers = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    ):
        raise RequestError(400, "emolens.layers must be a list of layer numbers", "emolens.layers")
    for layer in layers:
        if layer not in bank.layers:
            raise RequestError(
                400, f"emolens.layers: layer {layer} is not in the bank (layers: {bank.layers})",
                "emolens.layers",
            )  # fmt: skip
    return list(dict.fromkeys(layers))


def _unknown(name: str, where: str, emotions: list[str]) -> str:
    return (
        f"{where}: unknown emotion {name[:60]!r}; the bank has {len(emotions)} emotions "
        "(GET /emolens/bank lists them)"
    )


# --- responses ------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None,
    first: bool = False,
) -> dict:  # fmt: skip
    """One stream chunk (chat.completion.chunk or text_completion); `text` None: no delta."""
    if kind == "chat":
        delta: dict = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}  # fmt: skip
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def completion(
    kind: str, rid: str, model: str, text: str, finish: str, counts: tuple[int, int]
) -> dict:
    """A whole (non-streamed) response."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}  # fmt: skip
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(*counts)}  # fmt: skip
