"""THE decoding loop: batched, cached, with per-row sampling, stopping and steering.

A `Decoder` holds a batch of rows that share one KV cache. Each row has its prompt, its own
`Sampling` (greedy or nucleus, seeded), and optionally its own `SteeringVector` with a mode
("all", "prompt" or "response"). Rows can join while others are decoding (they are prefilled
together, left-padded, and their cache is merged into the running one) and leave when they
finish, so one loop serves a single streamed reply, a batch of experiment trials and a
server's changing set of requests. Every step feeds one token per row and yields a `Step`
with the token, its text and its residuals at the read layers (the residual a readout
projects); when nothing past the read layers is needed, the pass stops there.

Positions follow the attention mask (left padding shifts nothing); steering in "prompt"
mode touches the prefill, in "response" mode every fed token of the reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emolens.capture import add_hooks, check_layers, pad, positions_from_mask, run
from emolens.errors import EmolensError
from emolens.models import LoadedModel
from emolens.steer import MODES, SteeringVector, patch_vectors


@dataclass(frozen=True)
class Sampling:
    """How a row picks tokens: greedy at temperature 0, else a seeded nucleus sample."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise EmolensError(
                f"max_new_tokens must be a whole number >= 1, not {self.max_new_tokens!r}"
            )
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise EmolensError(f"{name} must be a finite number, not {value!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EmolensError(
                f"need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})"
            )

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed))


def pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """The next token: argmax at temperature 0, else a nucleus sample."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1:
        ordered, index = probs.sort(descending=True)
        drop = ordered.cumsum(0) - ordered >= top_p
        probs[index[drop]] = 0
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class Step:
    """One generated token of one row: `index` in the reply, `position` in the whole
    sequence, the new `text` piece ("" while a multi-byte character is incomplete), its
    residuals {layer: [width]} at the read layers, and `finish` ("stop", "length" or
    "halt") when it is the row's last token."""

    key: Hashable
    index: int
    token: int
    text: str
    position: int
    residuals: dict[int, torch.Tensor]
    finish: str | None = None


@dataclass
class Generation:
    """A finished row: its prompt and reply tokens, the reply text, why it ended, the
    end-of-sequence token it stopped at (if any), and with `keep` the residuals
    {layer: [tokens, width]} of the reply and {layer: [width]} of the last prompt token."""

    key: Hashable
    prompt: list[int]
    tokens: list[int]
    text: str
    finish: str
    stop_token: int | None = None
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_residuals: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Row:
    key: Hashable
    prompt: list[int]
    sampling: Sampling
    steering: SteeringVector | None
    mode: str
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    shown: str = ""
    pending: int | None = None
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    prompt_residuals: dict[int, torch.Tensor] = field(default_factory=dict)


class Decoder:
    """A running batch of rows sharing one KV cache (see the module docstring).

    `add` queues a row; `step` admits queued rows (when the cache allows joining a running
    batch) and feeds one token to every live row; `steer` changes a row's steering from its
    next token on and `halt` ends it. Finished rows are collected in `finished`.
    """

    def __init__(
        self, lm: LoadedModel, read_layers: Sequence[int] = (), keep: bool = False
    ) -> None:
        self.lm = lm
        self.read_layers = check_layers(lm, read_layers) if read_layers else []
        self.keep = keep
        self.rows: list[_Row] = []
        self.queue: list[_Row] = []
        self.finished: dict[Hashable, Generation] = {}
        self._cache: Any = None
        self._attention: torch.Tensor | None = None
        self._store: dict[int, torch.Tensor] = {}
        self._steering: dict[int, torch.Tensor] = {}
        self._steering_dirty = True

    @property
    def busy(self) -> bool:
        """Whether any row is live or queued."""
        return bool(self.rows or self.queue)

    def add(
        self,
        key: Hashable,
        prompt: Sequence[int],
        sampling: Sampling = Sampling(),
        steering: SteeringVector | None = None,
        mode: str = "all",
    ) -> None:
        """Queue a row: prompt token ids, sampling, and optional steering in `mode`."""
        if key in self.finished or any(r.key == key for r in self.rows + self.queue):
            raise EmolensError(f"row {key!r} is already in this decoder")
        if mode not in MODES:
            raise EmolensError(f"steering mode {mode!r} must be one of {', '.join(MODES)}")
        if not prompt:
            raise EmolensError("cannot generate from an empty prompt")
        limit = self.lm.context_limit
        if limit and len(prompt) + sampling.max_new_tokens > limit:
            raise EmolensError(
                f"prompt plus max_new_tokens has {len(prompt) + sampling.max_new_tokens} tokens; "
                f"{self.lm.name} reads at most {limit}"
            )
        if steering is not None:
            check_layers(self.lm, steering.layers)
        self.queue.append(_Row(key, list(prompt), sampling, steering, mode, sampling.generator()))

    def steer(self, key: Hashable, steering: SteeringVector | None, mode: str = "response") -> None:
        """Replace a live row's steering from its next fed token on."""
        row = self._live(key)
        if steering is not None:
            check_layers(self.lm, steering.layers)
        row.steering, row.mode = steering, mode
        self._steering_dirty = True

    def halt(self, key: Hashable) -> None:
        """End a live row now (its last step had no `finish`; it ends as "halt")."""
        row = self._live(key)
        self._finish([row], "halt")

    def _live(self, key: Hashable) -> _Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise EmolensError(f"row {key!r} is not decoding")

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """Admit queued rows, then feed every live row its next token; returns the new tokens."""
        if self.queue and (not self.rows or _joinable(self._cache)):
            self._prefill(self.queue)
            self.queue = []
        if not self.rows:
            return []
        final = all(len(r.tokens) + 1 >= r.sampling.max_new_tokens for r in self.rows)
        if final and not self.read_layers:
            output = None
        else:
            output = self._feed(final)
        steps, done = [], []
        for i, row in enumerate(self.rows):
            token = row.pending
            assert token is not None
            row.tokens.append(token)
            residuals = {layer: self._store[layer][i] for layer in self.read_layers}
            if self.keep:
                for layer, value in residuals.items():
                    row.kept.setdefault(layer, []).append(value.float().cpu())
            finish = None
            if len(row.tokens) >= row.sampling.max_new_tokens:
                finish = "length"
            else:
                assert output is not None  # only a final step runs without logits
                row.pending = self._pick(row, output.logits[i, -1])
                if row.pending in self.lm.eos_ids:
                    finish = "stop"
            text = self._text(row, final=finish is not None)
            position = len(row.prompt) + len(row.tokens) - 1
            steps.append(
                Step(row.key, len(row.tokens) - 1, token, text, position, residuals, finish)
            )
            if finish:
                done.append((row, finish))
        for row, finish in done:
            self._finish([row], finish)
        return steps

    def run(self, on_step: Callable[[list[Step]], None] | None = None) -> list[Generation]:
        """Step until every row has finished; returns the rows in the order they were added."""
        order = [r.key for r in self.rows + self.queue]
        while self.busy:
            steps = self.step()
            if on_step is not None and steps:
                on_step(steps)
        return [self.finished[key] for key in order]

    # --- internals ------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> None:
        lm = self.lm
        input_ids, mask = pad([r.prompt for r in rows], lm.pad_id, "left")
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        vectors = _stack(lm, rows, "prompt")
        patch = patch_vectors(lm, vectors) if vectors else None
        fns = {layer: (lambda hidden, layer=layer: self._store.__setitem__(layer, hidden[:, -1]))
               for layer in self.read_layers}  # fmt: skip
        handle = add_hooks(lm, fns) if fns else None
        try:
            output = lm.model(input_ids=input_ids, attention_mask=mask,
                              position_ids=positions_from_mask(mask), use_cache=True,
                              **lm.keep_logits(1))  # fmt: skip
        finally:
            for h in (patch, handle):
                if h is not None:
                    h.remove()
        cache = getattr(output, lm.cache_keyword)
        for i, row in enumerate(rows):
            row.prompt_residuals = (
                {k: v[i].float().cpu() for k, v in self._store.items()} if self.keep else {}
            )
            row.pending = self._pick(row, output.logits[i, -1])
        if self.rows and self._attention is not None:
            self._cache, self._attention = _merge(self._cache, self._attention, cache, mask)
        else:
            self._cache, self._attention = cache, mask
        self.rows += rows
        self._store = {}
        self._steering_dirty = True
        self._finish([r for r in rows if r.pending in lm.eos_ids], "stop")

    def _feed(self, final: bool) -> Any:
        lm = self.lm
        if self._steering_dirty:
            self._steering = _stack(lm, self.rows, "response")
            self._steering_dirty = False
        tokens = torch.tensor([[r.pending] for r in self.rows], device=lm.device)
        assert self._attention is not None
        self._attention = torch.cat([self._attention, torch.ones_like(tokens)], 1)
        positions = self._attention.sum(1, keepdim=True) - 1
        fns = {layer: (lambda hidden, layer=layer: self._store.__setitem__(layer, hidden[:, -1]))
               for layer in self.read_layers}  # fmt: skip
        stop = max(self.read_layers) if final else None
        handles = [patch_vectors(lm, self._steering)] if self._steering else []
        if fns:
            handles.append(add_hooks(lm, fns, stop_after=stop))
        try:
            output = run(lm, input_ids=tokens, attention_mask=self._attention,
                         position_ids=positions, use_cache=True, **lm.keep_logits(1),
                         **{lm.cache_keyword: self._cache})  # fmt: skip
        finally:
            for handle in handles:
                handle.remove()
        if output is not None:
            self._cache = getattr(output, lm.cache_keyword)
        return output

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        return pick(logits, row.sampling.temperature, row.sampling.top_p, row.generator)

    def _text(self, row: _Row, final: bool) -> str:
        decoded = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=False)
        if not final and decoded.endswith("\ufffd"):  # wait for the rest of the character
            return ""
        piece, row.shown = decoded[len(row.shown) :], decoded
        return piece

    def _finish(self, rows: Iterable[_Row], reason: str) -> None:
        leaving = {id(r) for r in rows}
        if not leaving:
            return
        for row in self.rows:
            if id(row) in leaving:
                self.finished[row.key] = Generation(
                    key=row.key,
                    prompt=row.prompt,
                    tokens=row.tokens,
                    text=self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True),
                    finish=reason,
                    stop_token=row.pending if reason == "stop" else None,
                    residuals={k: torch.stack(v) for k, v in row.kept.items()},
                    prompt_residuals=row.prompt_residuals,
                )
        keep = [i for i, r in enumerate(self.rows) if id(r) not in leaving]
        self.rows = [self.rows[i] for i in keep]
        self._steering_dirty = True
        if not self.rows:
            self._cache = self._attention = None
            return
        index = torch.tensor(keep, device=self.lm.device)
        self._cache.batch_select_indices(index)
        assert self._attention is not None
        self._attention = self._attention[index]


def _stack(lm: LoadedModel, rows: Sequence[_Row], phase: str) -> dict[int, torch.Tensor]:
    """Per-row steering vectors [rows, width] per layer for the prefill ("prompt") or the
    reply ("response"); rows without steering in that phase get zeros."""
    active = [(i, r.steering) for i, r in enumerate(rows)
              if r.steering is not None and r.mode in ("all", phase)]  # fmt: skip
    if not active:
        return {}
    layers = sorted({layer for _, s in active for layer in s.layers})
    vectors = {layer: torch.zeros(len(rows), lm.width) for layer in layers}
    for i, steering in active:
        for layer, vector in steering.vectors.items():
            vectors[layer][i] = vector
    return vectors


def _joinable(cache: Any) -> bool:
    """Whether new rows can join a running batch: a dynamic cache of plain (not sliding-window)
    layers, whose tensors can be left-padded and concatenated."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _merge(cache: Any, mask: torch.Tensor, joining: Any, joining_mask: torch.Tensor) -> tuple:
    """One cache and mask for the running rows followed by the joining rows: the shorter side
    is left-padded (masked out), then the batches are concatenated."""
    length = max(mask.shape[1], joining_mask.shape[1])

    def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim)

    for mine, theirs in zip(cache.layers, joining.layers, strict=True):
        mine.keys = torch.cat([left_pad(mine.keys, -2), left_pad(theirs.keys, -2)], 0)
        mine.values = torch.cat([left_pad(mine.values, -2), left_pad(theirs.values, -2)], 0)
    return cache, torch.cat([left_pad(mask, 1), left_pad(joining_mask, 1)], 0)


def decode(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    *,
    steering: SteeringVector | Sequence[SteeringVector | None] | None = None,
    mode: str = "all",
    read_layers: Sequence[int] = (),
    keep: bool = False,
    on_step: Callable[[list[Step]], None] | None = None,
) -> list[Generation]:
    """Generate a reply for every prompt (token ids) in one batch; `sampling` and `steering`
    are shared or given per prompt. Returns one Generation per prompt, in order."""
    count = len(prompts)
    samplings = [sampling] * count if isinstance(sampling, Sampling) else list(sampling)
    steerings = list(steering) if isinstance(steering, Sequence) else [steering] * count
    if len(samplings) != count or len(steerings) != count:
        raise EmolensError("give one sampling and one steering per prompt, or one for all")
    decoder = Decoder(lm, read_layers, keep)
    for i, prompt in enumerate(prompts):
        decoder.add(i, prompt, samplings[i], steerings[i], mode)
    return decoder.run(on_step)
