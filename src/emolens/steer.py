"""Steering (METHOD.md 5): a `SteeringVector` adds itself to the residual stream.

A SteeringVector holds one vector per layer in residual units: for emotions, `strength *
bank.norm_at(layer) * unit_vector`, summed over emotions. It is a value: `+`, `-` and scalar
`*` combine vectors (`2 * v` steers like `v` at twice the strength), `save`/`load` read and
write llama.cpp control vectors (GGUF), npz and safetensors, and `apply(lm, positions)` is a
context manager over the removable handle that `patch(lm, positions)` returns.

Positions are counted per row over real tokens: position 0 is the row's first non-padding
token (so left padding shifts nothing), padding is never steered, and in cached decoding the
new token's position is the cache length plus its index. "prompt" means the tokens of the
first forward pass of a sequence (the prefill), "response" every token fed after it (the
decoding steps); a forward without a KV cache is all prompt. A forward pre-hook on the
module that runs the decoder blocks works out which positions of each pass are steered; the
hooks come from `emolens.capture.add_hooks`, and no module is ever replaced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emolens.capture import HookHandle, add_hooks, check_layers
from emolens.errors import EmolensError
from emolens.models import LoadedModel

if TYPE_CHECKING:
    from emolens.bank import EmotionBank

MODES = ("all", "prompt", "response")
RANDOM_PREFIX = "random:"
MAX_STRENGTH = 1.0  # past this, text turns to gibberish on every model measured so far

Span = tuple[int, int]
Positions = str | Sequence[Span] | Sequence[Sequence[Span]]


def random_direction(width: int, seed: int) -> torch.Tensor:
    """A seeded random unit vector of `width` (the matched-norm control direction)."""
    generator = torch.Generator().manual_seed(int(seed))
    vector = torch.randn(width, generator=generator, dtype=torch.float64)
    return (vector / vector.norm()).float()


def check_strength(name: str, strength: object, allow_strong: bool = False) -> float:
    """A steering strength as a float: finite, and within +-MAX_STRENGTH unless allowed."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise EmolensError(f"steering strength of '{name}' must be a number, not {strength!r}")
    if not math.isfinite(strength):
        raise EmolensError(f"steering strength of '{name}' must be finite")
    if abs(strength) > MAX_STRENGTH and not allow_strong:
        raise EmolensError(
            f"steering strength {strength:g} of '{name}' is outside -{MAX_STRENGTH:g}..."
            f"{MAX_STRENGTH:g} (a fraction of the layer's mean residual norm; text degrades "
            "from about 0.2); pass allow_strong=True (CLI: --allow-strong) to use it anyway"
        )
    return float(strength)


@dataclass(frozen=True)
class SteeringVector:
    """Vectors {layer: [width]} added to the output of decoder block `layer`, with where they
    came from in `meta` (emotions and strengths, variant, model fingerprint)."""

    vectors: Mapping[int, torch.Tensor]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise EmolensError("a steering vector needs at least one layer")
        widths = {int(v.shape[-1]) for v in self.vectors.values()}
        for layer, vector in self.vectors.items():
            if vector.dim() != 1 or len(widths) != 1:
                raise EmolensError(
                    f"layer {layer}: steering vectors must all be [width], not {list(vector.shape)}"
                )
            if not bool(torch.isfinite(vector).all()):
                raise EmolensError(f"layer {layer}: the steering vector has non-finite values")
        clean = {int(k): v.detach().float().cpu() for k, v in sorted(self.vectors.items())}
        object.__setattr__(self, "vectors", clean)
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def layers(self) -> list[int]:
        return list(self.vectors)

    @property
    def width(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def strengths(self) -> dict[str, float]:
        """{emotion: strength} this vector was built from ({} for a loaded foreign vector)."""
        return dict(self.meta.get("emotions", {}))

    # --- arithmetic -----------------------------------------------------------------------

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if self.width != other.width:
            raise EmolensError(
                f"cannot add steering vectors of width {self.width} and {other.width}"
            )
        mine, theirs = self.meta.get("model"), other.meta.get("model")
        if mine and theirs and mine.get("weights") != theirs.get("weights"):
            raise EmolensError("cannot add steering vectors made for different models")
        layers = sorted(set(self.vectors) | set(other.vectors))
        zero = torch.zeros(self.width)
        vectors = {k: self.vectors.get(k, zero) + other.vectors.get(k, zero) for k in layers}
        emotions = self.strengths
        for name, value in other.strengths.items():
            emotions[name] = emotions.get(name, 0.0) + value
        return SteeringVector(vectors, {**other.meta, **self.meta, "emotions": emotions})

    def __mul__(self, scale: float) -> SteeringVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        vectors = {k: v * float(scale) for k, v in self.vectors.items()}
        emotions = {name: value * float(scale) for name, value in self.strengths.items()}
        return SteeringVector(vectors, {**self.meta, "emotions": emotions})

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    # --- applying -------------------------------------------------------------------------

    def patch(self, lm: LoadedModel, positions: Positions = "all") -> HookHandle:
        """Start adding this vector to `lm` at `positions`; returns the handle to `remove()`."""
        if self.width != lm.width:
            raise EmolensError(f"steering vector has width {self.width}; {lm.name} has {lm.width}")
        fingerprint = self.meta.get("model") or {}
        if fingerprint.get("weights") and fingerprint["weights"] != lm.fingerprint.get("weights"):
            raise EmolensError(
                f"steering vector was made for {fingerprint.get('name')} "
                f"(weights {fingerprint['weights']}), not {lm.name}"
            )
        return patch_vectors(lm, self.vectors, positions)

    @contextmanager
    def apply(self, lm: LoadedModel, positions: Positions = "all") -> Iterator[SteeringVector]:
        """Steer `lm` while the context is active (nested contexts add up)."""
        handle = self.patch(lm, positions)
        try:
            yield self
        finally:
            handle.remove()

    # --- making and storing ---------------------------------------------------------------

    @classmethod
    def from_bank(
        cls,
        bank: EmotionBank,
        strengths: Mapping[str, float],
        layers: int | Sequence[int] | None = None,
        *,
        variant: str = "denoised",
        allow_strong: bool = False,
    ) -> SteeringVector:
        """Sum of `strength * bank.norm_at(layer) * unit_vector` over `strengths` at each of
        `layers` (None: the bank's default layer; each layer with its own norm)."""
        if not strengths:
            raise EmolensError("no emotions to steer")
        checked = {name: check_strength(name, s, allow_strong) for name, s in strengths.items()}
        chosen = _bank_layers(bank, layers)
        vectors = {}
        for layer in chosen:
            total = torch.zeros(bank.width)
            for name, strength in checked.items():
                total += strength * bank.norm_at(layer) * bank.vector(name, layer, variant)
            vectors[layer] = total
        return cls(vectors, _provenance(bank, checked, variant))

    @classmethod
    def random(
        cls,
        bank: EmotionBank,
        seed: int,
        strength: float,
        layers: int | Sequence[int] | None = None,
        *,
        allow_strong: bool = False,
    ) -> SteeringVector:
        """The matched-norm control: a seeded random unit direction (the same at every layer)
        times `strength * bank.norm_at(layer)`, as long as an emotion vector of that strength."""
        name = f"{RANDOM_PREFIX}{int(seed)}"
        strength = check_strength(name, strength, allow_strong)
        unit = random_direction(bank.width, seed)
        vectors = {
            layer: strength * bank.norm_at(layer) * unit for layer in _bank_layers(bank, layers)
        }
        return cls(vectors, _provenance(bank, {name: strength}, "random"))

    @classmethod
    def from_spec(
        cls,
        bank: EmotionBank,
        strengths: Mapping[str, float],
        layers: int | Sequence[int] | None = None,
        *,
        variant: str = "denoised",
        allow_strong: bool = False,
    ) -> SteeringVector:
        """Like `from_bank`, where a name "random:SEED" (the CLI spelling) is a matched-norm
        random control."""
        parts = []
        for name, strength in strengths.items():
            if name.startswith(RANDOM_PREFIX):
                seed = name[len(RANDOM_PREFIX) :]
                if not seed.lstrip("-").isdigit():
                    raise EmolensError(
                        f"'{name}': a random direction is named random:SEED (an integer)"
                    )
                parts.append(
                    cls.random(bank, int(seed), strength, layers, allow_strong=allow_strong)
                )
            else:
                parts.append(cls.from_bank(bank, {name: strength}, layers, variant=variant,
                                           allow_strong=allow_strong))  # fmt: skip
        if not parts:
            raise EmolensError("no emotions to steer")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write a llama.cpp control vector (.gguf), .npz or .safetensors file, atomically."""
        from emolens.vector_io import write

        return write(self.vectors, path, dict(self.meta), format)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by `save` (or any llama.cpp control-vector GGUF)."""
        from emolens.vector_io import read

        vectors, meta = read(Path(path))
        return cls(vectors, meta)


def _bank_layers(bank: EmotionBank, layers: int | Sequence[int] | None) -> list[int]:
    if layers is None:
        return [bank.layers[bank.layer_index(None)]]
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise EmolensError("no layers to steer")
    for layer in chosen:
        bank.layer_index(layer)
    return sorted(set(chosen))


def _provenance(bank: EmotionBank, strengths: Mapping[str, float], variant: str) -> dict:
    return {
        "emotions": dict(strengths),
        "variant": variant,
        "model": dict(bank.model),
        "norms": {str(layer): bank.norm_at(layer) for layer in bank.layers},
    }


@contextmanager
def steer(
    lm: LoadedModel,
    bank: EmotionBank,
    emotions: Mapping[str, float],
    layers: int | Sequence[int] | None = None,
    positions: Positions = "all",
    variant: str = "denoised",
) -> Iterator[SteeringVector]:
    """The short form: `with steer(lm, bank, {"calm": 0.05}): ...` applies
    `bank.steering(...)` (names "random:SEED" are matched-norm controls)."""
    bank.check_model(lm)
    vector = SteeringVector.from_spec(bank, emotions, layers, variant=variant)
    check_layers(lm, vector.layers)
    with vector.apply(lm, positions):
        yield vector


def parse_strengths(
    specs: Sequence[str], default: float | None = None, allow_strong: bool = False
) -> dict[str, float]:
    """Parse "calm=0.05"-style items into {emotion: strength}; a bare name gets `default`
    (an error when `default` is None). A name given twice, or a strength outside
    +-MAX_STRENGTH (unless `allow_strong`), is an error."""
    strengths: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not name:
            raise EmolensError(f"'{spec}': expected EMOTION=STRENGTH, e.g. calm=0.05")
        if not sep:
            if default is None:
                raise EmolensError(f"'{spec}': give a strength, e.g. {name}=0.05")
            strength = default
        else:
            try:
                strength = float(value)
            except ValueError:
                raise EmolensError(f"'{spec}': strength '{value}' is not a number") from None
        check_strength(name, strength, allow_strong)
        if name in strengths:
            raise EmolensError(f"'{name}' is given twice; give each emotion once")
        strengths[name] = strength
    return strengths


# --- the hooks ------------------------------------------------------------------------------


class _Plan:
    """Which positions a steering patch touches, validated once: a mode for every row, or
    (start, end) spans for every row, or spans per row."""

    def __init__(self, positions: Positions) -> None:
        self.mode, self.starts, self.ends, self.per_row = "spans", None, None, False
        if isinstance(positions, str):
            if positions not in MODES:
                raise EmolensError(
                    f"positions '{positions}' must be one of {', '.join(MODES)} or token spans"
                )
            self.mode = positions
            return
        rows: list[Any] = list(positions)
        self.per_row = bool(rows) and not _is_span(rows[0])
        table: list[list[Any]] = [list(row) for row in rows] if self.per_row else [rows]
        for r, row in enumerate(table):
            for span in row:
                if not _is_span(span) or span[0] < 0 or span[1] < span[0]:
                    where = f"row {r}: " if self.per_row else ""
                    raise EmolensError(
                        f"{where}bad span {span!r}: spans are (start, end) pairs with "
                        "0 <= start <= end (end exclusive)"
                    )
        width = max([len(row) for row in table] + [1])
        starts = torch.zeros(len(table), width, dtype=torch.long)
        ends = torch.zeros(len(table), width, dtype=torch.long)
        for r, row in enumerate(table):
            for s, (start, end) in enumerate(row):
                starts[r, s], ends[r, s] = start, end
        self.starts, self.ends = starts, ends


def _is_span(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
    )


class _Tracker:
    """Called before each forward of the blocks' owner: records which of the new positions
    are steered (`mask` [batch, new, 1], None for all) and whether any is (`active`)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.active = True
        self.mask: torch.Tensor | None = None
        self.prompt: torch.Tensor | None = None  # real prompt tokens per row

    def __call__(self, bound: dict[str, Any]) -> None:
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            return
        batch, new = int(tokens.shape[0]), int(tokens.shape[1])
        past = _cache_length(bound.get("cache", bound.get("past_key_values")))
        attention = bound.get("attention_mask")
        if self.plan.mode == "all":
            steered = None
            if isinstance(attention, torch.Tensor) and attention.dim() == 2:
                steered = attention[:, past:].bool() if attention.shape[-1] == past + new else None
            self.active = steered is None or bool(steered.any())
            self.mask = None if steered is None or bool(steered.all()) else steered[..., None]
            return
        index, valid = _positions(attention, batch, new, past, tokens.device)
        if self.plan.mode in ("prompt", "response"):
            if past == 0:
                self.prompt = valid.sum(1)
            elif self.prompt is None or self.prompt.shape[0] != batch:
                self.prompt = index[:, 0].clone()  # prefill unseen: everything from here on
            before = index < self.prompt.to(index.device)[:, None]
            steered = valid & (before if self.plan.mode == "prompt" else ~before)
        else:
            steered = valid & self._in_spans(index, batch)
        self.active = bool(steered.any())
        self.mask = None if bool(steered.all()) else steered[..., None]

    def _in_spans(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        assert self.plan.starts is not None and self.plan.ends is not None
        starts, ends = self.plan.starts.to(index.device), self.plan.ends.to(index.device)
        if self.plan.per_row and starts.shape[0] != batch:
            raise EmolensError(
                f"steering spans are given for {starts.shape[0]} rows, the batch has {batch}"
            )
        position = index[:, :, None]
        return ((position >= starts[:, None, :]) & (position < ends[:, None, :])).any(-1)


def _is_2d(attention: Any) -> bool:
    return isinstance(attention, torch.Tensor) and attention.dim() == 2


def _cache_length(cache: Any) -> int:
    """Positions already in a KV cache (0 without one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache
    return 0


def _positions(
    attention: Any, batch: int, new: int, past: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token index [batch, new] of each new position, and whether it is a real token."""
    if _is_2d(attention) and attention.shape[-1] == past + new:
        real = attention.to(device).bool()
        index = real.long().cumsum(-1)[:, past:] - 1
        return index, real[:, past:]
    index = torch.arange(past, past + new, device=device).expand(batch, new)
    return index, torch.ones(batch, new, dtype=torch.bool, device=device)


def _adder(vector: torch.Tensor, tracker: _Tracker, layer: int):  # noqa: ANN202
    cached = {"vector": vector}

    def add(hidden: torch.Tensor) -> torch.Tensor | None:
        if not tracker.active:
            return None
        delta = cached["vector"]
        if delta.device != hidden.device or delta.dtype != hidden.dtype:
            delta = cached["vector"] = delta.to(hidden.device, hidden.dtype)
        if delta.dim() == 2:
            if delta.shape[0] != hidden.shape[0]:
                raise EmolensError(
                    f"layer {layer}: steering has one vector per row for {delta.shape[0]} rows, "
                    f"the batch has {hidden.shape[0]}"
                )
            delta = delta[:, None, :]
        if tracker.mask is not None:
            delta = delta * tracker.mask.to(hidden.device, hidden.dtype)
        return hidden + delta

    return add


def patch_vectors(
    lm: LoadedModel, vectors: Mapping[int, torch.Tensor], positions: Positions = "all"
) -> HookHandle:
    """Add `vectors[layer]` ([width] for every row, or [batch, width] one per row) to the
    output of block `layer` at `positions`; returns the handle whose `remove()` stops it."""
    layers = check_layers(lm, list(vectors))
    prepared = {}
    for layer in layers:
        vector = torch.as_tensor(vectors[layer])
        if vector.dim() not in (1, 2) or vector.shape[-1] != lm.width:
            raise EmolensError(
                f"layer {layer}: a steering vector must be [{lm.width}] or [batch, {lm.width}], "
                f"not {list(vector.shape)}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise EmolensError(f"layer {layer}: the steering vector has non-finite values")
        prepared[layer] = vector.detach()
    tracker = _Tracker(_Plan(positions))
    fns = {layer: _adder(prepared[layer], tracker, layer) for layer in layers}
    return add_hooks(lm, fns, before=tracker, first=True)


@contextmanager
def steer_vectors(
    lm: LoadedModel, vectors: Mapping[int, torch.Tensor], positions: Positions = "all"
) -> Iterator[None]:
    """`patch_vectors` as a context manager: the hooks are removed on exit, also after an error."""
    handle = patch_vectors(lm, vectors, positions)
    try:
        yield
    finally:
        handle.remove()
