"""Guards: monitor-gated steering. A rule watches one emotion's reading as a reply is generated
and, when the reading crosses a threshold, changes the reply's steering or stops it.

Units. A guard (and the dashboard's token colours) reads emotions in *scaled readout units*:
a token's projection (`emolens.readout.score`: its residual at the read layer dotted with the
emotion's unit vector) divided by that emotion's reference scale. The reference scale is the
99th-percentile magnitude of the emotion's projection over the valid tokens of a fixed shipped
reference set (the first exchange of 30 neutral dialogues and 30 stories spread over the
shipped corpus, each cut to about 128 tokens), read with `read_many` at the same layer and variant, computed once per
(model, bank, layer, variant) and kept in memory. A scaled reading of 1.0 is as strong as the
top 1% of ordinary text; 0 is no projection. The value a rule compares is the mean of the
scaled readings of the reply's last `window` tokens (unclipped; the dashboard clips colours to
[-1, 1]).

A rule, as JSON: `{"when": "desperate", "above": 0.6, "window": 8,
"then": {"steer": {"calm": 0.05}}, "or": "stop"}`. `then` is what the first firing does: steer
with the given strengths for the rest of the reply (added to the reply's own steering), or
"stop" (the default). `or: "stop"` stops the reply if the rule fires again once a full new
window of tokens has been read under the changed steering.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from emolens.errors import EmolensError
from emolens.steer import RANDOM_PREFIX, check_strength

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.generation import Decoder
    from emolens.models import LoadedModel
    from emolens.steer import SteeringVector

RULE_KEYS = ("when", "above", "below", "window", "then", "or")
MAX_WINDOW = 256
DEFAULT_WINDOW = 8
REFERENCE_COUNT = 30  # neutral dialogues, and as many stories
REFERENCE_TOKENS = 128  # each reference text is cut to this many tokens
QUANTILE = 0.99
EXAMPLE = '{"when": "desperate", "above": 0.6, "window": 8, "then": {"steer": {"calm": 0.05}}}'

_SCALES: dict[tuple, torch.Tensor] = {}


@dataclass(frozen=True)
class Fired:
    """A guard firing: at reply token `index`, the windowed `reading` crossed the threshold,
    and `action` ("steer" or "stop") followed."""

    index: int
    reading: float
    action: str
    guard: Guard

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "reading": round(self.reading, 5),
            "action": self.action,
            "rule": self.guard.to_dict(),
        }

    def describe(self) -> str:
        g = self.guard
        what = "stopping" if self.action == "stop" else f"steering {_strengths(g.steer)}"
        return (
            f"guard: {g.emotion} {self.reading:+.2f} {g.direction} {g.threshold:g} over "
            f"{g.window} tokens at token {self.index}: {what}"
        )


@dataclass(frozen=True)
class Guard:
    """A parsed rule (see the module docstring); `actions` are what the first and (with `or`)
    the second firing do."""

    emotion: str
    threshold: float
    direction: str
    window: int = DEFAULT_WINDOW
    steer: Mapping[str, float] = field(default_factory=dict)
    actions: tuple[str, ...] = ("stop",)

    @classmethod
    def parse(
        cls,
        rule: object,
        emotions: Sequence[str] | None = None,
        allow_strong: bool = False,
    ) -> Guard:
        """A Guard from a rule dict (or its JSON text), checked; `emotions` are the names a
        rule may use (None: any)."""
        if isinstance(rule, str):
            try:
                rule = json.loads(rule)
            except json.JSONDecodeError as error:
                raise EmolensError(f"guard: not valid JSON ({error}); e.g. {EXAMPLE}") from None
        if not isinstance(rule, Mapping):
            raise EmolensError(f"guard: a rule is a JSON object such as {EXAMPLE}")
        unknown = [key for key in rule if key not in RULE_KEYS]
        if unknown:
            raise EmolensError(
                f"guard: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"a rule has {', '.join(RULE_KEYS)}"
            )
        emotion = rule.get("when")
        if not isinstance(emotion, str) or not emotion:
            raise EmolensError("guard: field 'when' must name an emotion")
        _check_name(emotion, emotions, "when")
        directions = [d for d in ("above", "below") if d in rule]
        if len(directions) != 1:
            raise EmolensError("guard: give exactly one of 'above' or 'below' (a number)")
        direction = directions[0]
        threshold = rule[direction]
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise EmolensError(f"guard: field '{direction}' must be a finite number")
        window = rule.get("window", DEFAULT_WINDOW)
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise EmolensError(
                f"guard: field 'window' must be a whole number from 1 to {MAX_WINDOW}, "
                f"not {window!r}"
            )
        then = rule.get("then", "stop")
        steer: dict[str, float] = {}
        if then == "stop":
            actions: tuple[str, ...] = ("stop",)
        elif isinstance(then, Mapping) and set(then) == {"steer"}:
            strengths = then["steer"]
            if not isinstance(strengths, Mapping) or not strengths:
                raise EmolensError(
                    "guard: 'then.steer' must be an object of strengths such as {\"calm\": 0.05}"
                )
            for name, strength in strengths.items():
                if not isinstance(name, str) or name.startswith(RANDOM_PREFIX):
                    raise EmolensError(f"guard: 'then.steer' names an emotion, not {name!r}")
                _check_name(name, emotions, "then.steer")
                try:
                    steer[name] = check_strength(name, strength, allow_strong)
                except EmolensError as error:
                    raise EmolensError(f"guard: 'then.steer': {error}") from None
            actions = ("steer",)
        else:
            raise EmolensError(
                'guard: field \'then\' must be "stop" or {"steer": {EMOTION: STRENGTH}}'
            )
        if "or" in rule:
            if rule["or"] != "stop":
                raise EmolensError("guard: field 'or' can only be \"stop\"")
            if actions != ("steer",):
                raise EmolensError("guard: 'or': \"stop\" follows a 'then' that steers")
            actions = ("steer", "stop")
        return cls(emotion, float(threshold), direction, window, steer, actions)

    def to_dict(self) -> dict:
        """The rule as JSON-ready data (what `parse` reads)."""
        rule: dict = {"when": self.emotion, self.direction: self.threshold, "window": self.window}
        rule["then"] = {"steer": dict(self.steer)} if self.actions[0] == "steer" else "stop"
        if len(self.actions) > 1:
            rule["or"] = "stop"
        return rule

    def crosses(self, reading: float) -> bool:
        return reading > self.threshold if self.direction == "above" else reading < self.threshold

    def check(self, readings: Sequence[float], fired: Sequence[Fired] = ()) -> Fired | None:
        """Whether the rule fires at the last of `readings` (the reply's scaled readings of
        the watched emotion so far), given its earlier firings: the mean of the last `window`
        readings crosses the threshold, and all of them came after the last firing."""
        if len(fired) >= len(self.actions):
            return None
        start = fired[-1].index + 1 if fired else 0
        if len(readings) - start < self.window:
            return None
        reading = math.fsum(readings[-self.window :]) / self.window
        if not self.crosses(reading):
            return None
        return Fired(len(readings) - 1, reading, self.actions[len(fired)], self)

    def steering(
        self,
        bank: EmotionBank,
        layers: int | Sequence[int] | None = None,
        *,
        variant: str = "denoised",
        allow_strong: bool = False,
    ) -> SteeringVector | None:
        """The SteeringVector that a "steer" firing adds (None for a rule that only stops)."""
        if not self.steer:
            return None
        return bank.steering(self.steer, layers, variant=variant, allow_strong=allow_strong)


class Watch:
    """One reply under a guard: `push` each token's projection of the watched emotion; it
    returns the firing, if any, after scaling by the reference `scale`."""

    def __init__(self, guard: Guard, scale: float) -> None:
        self.guard, self.scale = guard, float(scale)
        self.readings: list[float] = []
        self.fired: list[Fired] = []

    def push(self, projection: float) -> Fired | None:
        self.readings.append(projection / self.scale)
        fired = self.guard.check(self.readings, self.fired)
        if fired is not None:
            self.fired.append(fired)
        return fired


def act(
    fired: Fired,
    decoder: Decoder,
    key: Hashable,
    base: SteeringVector | None,
    base_mode: str,
    extra: SteeringVector | None,
) -> None:
    """Carry out a firing on a live decoder row: stop it, or steer the rest of its reply with
    its own steering (`base` in `base_mode`) plus the guard's `extra` vector."""
    if fired.action == "stop":
        decoder.halt(key)
        return
    if extra is None:
        raise EmolensError("a guard that steers needs its steering vector")
    steering = base + extra if base is not None and base_mode != "prompt" else extra
    decoder.steer(key, steering, "response")


def reference_items(
    lm: LoadedModel, count: int = REFERENCE_COUNT, max_tokens: int = REFERENCE_TOKENS
) -> list[str | list[dict]]:
    """The reference set: `count` neutral dialogues (first exchange) and `count` stories spread
    over the shipped corpus, each cut to about `max_tokens` tokens."""
    from emolens.corpus import corpus_files, dialogue_messages, read_records

    records = [r for path in corpus_files() for r in read_records(path)[0]]
    neutral = sorted((r for r in records if r.kind == "neutral"), key=lambda r: r.id)
    stories = sorted((r for r in records if r.kind == "story"), key=lambda r: r.id)
    items: list[str | list[dict]] = []
    for record in neutral[:count]:
        messages = dialogue_messages(record.text)[:2]
        items.append([{**m, "content": _cut(lm, m["content"], max_tokens // 2)} for m in messages])
    step = max(1, len(stories) // count)
    items += [_cut(lm, record.text, max_tokens) for record in stories[::step][:count]]
    return items


def reference_scale(
    lm: LoadedModel, bank: EmotionBank, layer: int | None = None, variant: str = "denoised"
) -> torch.Tensor:
    """Per-emotion scale [emotions] of the scaled readout units (see the module docstring),
    computed once per (model, bank, layer, variant) and cached in memory."""
    from emolens.readout import read_many, resolve_layer

    layer = resolve_layer(lm, bank, layer)
    units = bank.matrix(layer, variant).contiguous()
    key = (
        lm.fingerprint.get("weights"),
        layer,
        variant,
        hashlib.sha256(units.numpy().tobytes()).hexdigest(),
    )
    if key not in _SCALES:
        readouts = read_many(lm, bank, reference_items(lm), layer=layer, variant=variant,
                             pool=None)  # fmt: skip
        values = torch.cat([r.projection[r.valid] for r in readouts]).abs()
        _SCALES[key] = torch.quantile(values, QUANTILE, dim=0).clamp(min=1e-6)
    return _SCALES[key]


def _cut(lm: LoadedModel, text: str, max_tokens: int) -> str:
    """`text` up to the end of its `max_tokens`-th token."""
    offsets = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = offsets["offset_mapping"]
    return text if len(spans) <= max_tokens else text[: spans[max_tokens - 1][1]]


def _check_name(name: str, emotions: Sequence[str] | None, where: str) -> None:
    if emotions is not None and name not in emotions:
        raise EmolensError(
            f"guard: unknown emotion '{name}' in '{where}'; the bank has {len(emotions)} emotions"
        )


def _strengths(strengths: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:+g}" for name, value in strengths.items())
