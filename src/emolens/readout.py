"""Reading emotions (METHOD.md 3.6): per-token scores of text, conversations, data sets and
live generation.

Reading is a projection of the residual stream at one layer onto the bank's unit vectors:
one forward pass that stops after that layer, then one [tokens, width] x [width, emotions]
matmul. `score` is the one scoring function: with `centre=False` (token readouts) it projects
the raw residual; with `centre=True` (held-out classification, scenarios) it first subtracts
the bank's centre, the mean of all emotion means at that layer. `read` reads one text or
conversation, `read_many` a whole data set in length-bucketed batches, and `generate` a reply
as it is generated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from emolens.bank import EmotionBank
from emolens.calibration import resolve_baseline
from emolens.capture import check_layers, pad, plan_batches, residuals, special_ids
from emolens.chat import Rendered, render
from emolens.errors import EmolensError
from emolens.generation import Decoder, Sampling
from emolens.models import LoadedModel

KINDS = ("projection", "cosine")
POOLS = ("mean", "last", "reply_start")
_FINAL_PUNCTUATION = re.compile(r"[.!?]['\")\]]*$")


def resolve_layer(lm: LoadedModel, bank: EmotionBank, layer: int | None) -> int:
    """The layer to read (None: the bank's default), checked against the bank and model."""
    layer = bank.layers[bank.layer_index(None if layer is None else int(layer))]
    check_layers(lm, [layer])
    bank.check_model(lm)
    return layer


def score(
    states: torch.Tensor,
    bank: EmotionBank,
    layer: int | None = None,
    variant: str = "denoised",
    *,
    centre: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Projection [..., emotions] of residual states [..., width] on the unit vectors at
    `layer`, after subtracting the bank's centre when `centre` is True."""
    units = bank.matrix(layer, variant).to(states.device, dtype)
    states = states.to(dtype)
    if centre:
        states = states - bank.center[bank.layer_index(layer)].to(states.device, dtype)
    return states @ units.T


def _projection_and_cosine(
    states: torch.Tensor, bank: EmotionBank, layer: int, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    states = states.float()
    projection = score(states, bank, layer, variant)
    cosine = projection / states.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return projection.cpu(), cosine.cpu()


@dataclass
class TurnMean:
    """Mean score of one turn's tokens, [emotions]."""

    turn: int
    role: str
    scores: torch.Tensor


@dataclass
class Segment:
    """A run of tokens [start, end) of one turn: a sentence, or a line."""

    start: int
    end: int
    role: str
    turn: int


@dataclass
class Readout:
    """Per-token emotion scores of a text or conversation at one layer.

    `projection` is activation . unit vector and `cosine` the same divided by the
    activation norm, both [tokens, emotions]. `valid` marks tokens that enter statistics:
    every token but the first (an attention sink with a huge norm) and special tokens.
    """

    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    roles: list[str]
    turns: list[int]
    emotions: list[str]
    layer: int
    variant: str
    projection: torch.Tensor
    cosine: torch.Tensor
    valid: torch.Tensor
    reply_starts: list[int]
    baseline: torch.Tensor | None = None  # subtracted from `projection` (see calibration.py)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, kind: str = "projection") -> torch.Tensor:
        """[tokens, emotions] scores of one kind: "projection" or "cosine"."""
        if kind not in KINDS:
            raise EmolensError(f"unknown score kind '{kind}': choose from {KINDS}")
        return getattr(self, kind)

    def emotion_index(self, name: str) -> int:
        if name not in self.emotions:
            raise EmolensError(f"unknown emotion '{name}'; this readout has {len(self.emotions)}")
        return self.emotions.index(name)

    def select(self, names: Sequence[str]) -> Readout:
        """The same readout restricted to `names`, in that order."""
        index = torch.tensor([self.emotion_index(n) for n in names], dtype=torch.long)
        return replace(
            self,
            emotions=list(names),
            projection=self.projection[:, index],
            cosine=self.cosine[:, index],
        )

    def scaled(self, kind: str = "projection", quantile: float = 0.99) -> torch.Tensor:
        """Scores in [-1, 1] for display: each emotion divided by its 99th-percentile
        magnitude over the valid tokens, clipped; excluded tokens read 0."""
        scores = self.scores(kind)
        if not bool(self.valid.any()):
            return torch.zeros_like(scores)
        scale = torch.quantile(scores[self.valid].abs(), quantile, dim=0).clamp(min=1e-12)
        return (scores / scale).clamp(-1, 1) * self.valid[:, None]

    def top(self, k: int = 5, token: int = -1, kind: str = "projection") -> list[tuple[str, float]]:
        """The `k` highest-scoring emotions at one token, best first."""
        if not -len(self) <= token < len(self):
            raise EmolensError(f"token {token} out of range: the readout has {len(self)}")
        return top_emotions(self.scores(kind)[token], self.emotions, k)

    def smooth(self, window: int) -> Readout:
        """Moving average over `window` nearby tokens of the same turn (valid tokens only)."""
        if window < 1:
            raise EmolensError(f"smoothing window must be at least 1, not {window}")
        if window == 1:
            return self
        return replace(
            self,
            projection=self._smoothed(self.projection, window),
            cosine=self._smoothed(self.cosine, window),
        )

    def _smoothed(self, scores: torch.Tensor, window: int) -> torch.Tensor:
        weights = self.valid.float()[:, None]
        out = torch.zeros_like(scores)
        left, right = window // 2, (window - 1) // 2
        for start, end in _runs(self.turns):
            values = torch.cat([torch.zeros(1, scores.shape[1]), (scores * weights)[start:end]])
            counts = torch.cat([torch.zeros(1, 1), weights[start:end]])
            sums, totals = values.cumsum(0), counts.cumsum(0)
            index = torch.arange(end - start)
            high = (index + right + 1).clamp(max=end - start)
            low = (index - left).clamp(min=0)
            out[start:end] = (sums[high] - sums[low]) / (totals[high] - totals[low]).clamp(min=1)
        return out

    def turn_means(self, kind: str = "projection") -> list[TurnMean]:
        """Mean score over each turn's valid tokens, in order (plain text is turn 0)."""
        scores, turns = self.scores(kind), torch.tensor(self.turns)
        means = []
        for turn in sorted({t for t in self.turns if t >= 0}):
            mask = (turns == turn) & self.valid
            if bool(mask.any()):
                role = self.roles[self.turns.index(turn)]
                means.append(TurnMean(turn, role, scores[mask].mean(0)))
        return means

    def reply_start(self, index: int = -1, kind: str = "projection") -> torch.Tensor:
        """Scores [emotions] where an assistant reply begins (default: the last one)."""
        if not self.reply_starts:
            raise EmolensError("this readout has no assistant reply (read a conversation)")
        return self.scores(kind)[self.reply_starts[index]]

    def segments(self) -> list[Segment]:
        """Sentences (or lines) of every turn's content; template tokens are left out."""
        found, start = [], None
        for i, (token, role) in enumerate(zip(self.tokens, self.roles, strict=True)):
            if role == "template":
                continue
            if start is None:
                start = i
            last = i + 1 == len(self) or self.turns[i + 1] != self.turns[i]
            if last or ends_sentence(token, self.tokens[i + 1]):
                if self.text[self.offsets[start][0] : self.offsets[i][1]].strip():
                    found.append(Segment(start, i + 1, role, self.turns[i]))
                start = None
        return found

    def segment_mean(self, segment: Segment, kind: str = "projection") -> torch.Tensor:
        """Mean score [emotions] over a segment's valid tokens (all its tokens if none)."""
        scores = self.scores(kind)[segment.start : segment.end]
        mask = self.valid[segment.start : segment.end]
        return scores[mask].mean(0) if bool(mask.any()) else scores.mean(0)

    def to_frame(self, kind: str = "projection"):  # noqa: ANN201 - pandas is optional
        """A pandas DataFrame: one row per token, token columns then one column per emotion."""
        try:
            import pandas as pd
        except ImportError:
            raise EmolensError("Readout.to_frame() needs pandas: pip install pandas") from None
        frame = pd.DataFrame(
            {
                "token": self.tokens,
                "start": [a for a, _ in self.offsets],
                "end": [b for _, b in self.offsets],
                "role": self.roles,
                "turn": self.turns,
                "valid": self.valid.tolist(),
            }
        )
        values = pd.DataFrame(self.scores(kind).numpy(), columns=self.emotions)
        return pd.concat([frame, values], axis=1)

    def to_dict(self, digits: int = 5) -> dict:
        """A JSON-serialisable summary: tokens, both score kinds, turn means, reply starts."""

        def rows(t: torch.Tensor) -> list:
            return [[round(float(x), digits) for x in row] for row in t.tolist()]

        return {
            "text": self.text,
            "layer": self.layer,
            "variant": self.variant,
            "emotions": self.emotions,
            "tokens": [
                {"text": tok, "start": a, "end": b, "role": role, "turn": turn, "valid": ok}
                for tok, (a, b), role, turn, ok in zip(
                    self.tokens,
                    self.offsets,
                    self.roles,
                    self.turns,
                    self.valid.tolist(),
                    strict=True,
                )
            ],  # fmt: skip
            "projection": rows(self.projection),
            "cosine": rows(self.cosine),
            "reply_starts": self.reply_starts,
            "turns": [
                {"turn": m.turn, "role": m.role, "projection": rows(m.scores[None])[0]}
                for m in self.turn_means()
            ],
        }


def top_emotions(scores: torch.Tensor, emotions: list[str], k: int) -> list[tuple[str, float]]:
    """The `k` highest of `scores` [emotions] with their names, best first."""
    values, index = scores.topk(min(k, len(emotions)))
    return [(emotions[i], float(v)) for v, i in zip(values.tolist(), index.tolist(), strict=True)]


def ends_sentence(piece: str, following: str | None = None) -> bool:
    """Whether a token's text closes a line, or a sentence: final punctuation followed by
    whitespace or by nothing (`following` is the next token's text, None at the end)."""
    if "\n" in piece:
        return True
    stripped = piece.rstrip()
    if not _FINAL_PUNCTUATION.search(stripped):
        return False
    return stripped != piece or not following or following[0].isspace()


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive values."""
    bounds = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1]] + [len(values)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _check_length(lm: LoadedModel, n: int) -> None:
    if n == 0:
        raise EmolensError("nothing to read: the input is empty")
    limit = lm.context_limit
    if limit and n > limit:
        raise EmolensError(f"input has {n} tokens; {lm.name} reads at most {limit}")


def _readout(
    lm: LoadedModel, bank: EmotionBank, rendered: Rendered, states: torch.Tensor, layer: int,
    variant: str, offset: torch.Tensor | None = None,
) -> Readout:  # fmt: skip
    projection, cosine = _projection_and_cosine(states, bank, layer, variant)
    if offset is not None:
        projection = projection - offset
    ids = torch.tensor(rendered.ids)
    valid = ~torch.isin(ids, special_ids(lm.tokenizer))
    valid[0] = False
    return Readout(
        text=rendered.text,
        ids=rendered.ids,
        tokens=rendered.tokens,
        offsets=rendered.offsets,
        roles=rendered.roles,
        turns=rendered.turns,
        emotions=list(bank.emotions),
        layer=layer,
        variant=variant,
        projection=projection,
        cosine=cosine,
        valid=valid,
        reply_starts=rendered.reply_starts,
        baseline=offset,
    )


def read(
    lm: LoadedModel,
    bank: EmotionBank,
    text_or_messages: str | Sequence[dict],
    *,
    layer: int | None = None,
    variant: str = "denoised",
    baseline: str | torch.Tensor | None = None,
) -> Readout:
    """Read every emotion of `bank` at every token of a text or a conversation.

    A string is read as plain text; a list of {"role", "content"} messages goes through the
    model's chat template (or the plain Human/Assistant format). A conversation that does
    not end with an assistant turn is read with the generation prompt appended, so that
    `reply_start()` gives the reading where the assistant's reply would begin.
    """
    layer = resolve_layer(lm, bank, layer)
    offset = resolve_baseline(lm, bank, baseline, layer, variant)
    rendered = _render(lm, text_or_messages)
    ids = torch.tensor([rendered.ids], dtype=torch.long)
    states = residuals(lm, ids, torch.ones_like(ids), [layer])[layer][0]
    return _readout(lm, bank, rendered, states, layer, variant, offset)


def _render(lm: LoadedModel, item: str | Sequence[dict]) -> Rendered:
    if isinstance(item, str) and not item.strip():
        raise EmolensError("nothing to read: the text is empty or only whitespace")
    rendered = render(lm, item)
    _check_length(lm, len(rendered.ids))
    return rendered


def pooled(readout: Readout, pool: str, kind: str = "projection") -> torch.Tensor:
    """One score per emotion for a whole readout: the mean over its valid tokens, the last
    token, or the last reply start."""
    scores = readout.scores(kind)
    if pool == "mean":
        return scores[readout.valid].mean(0) if bool(readout.valid.any()) else scores.mean(0)
    if pool == "last":
        return scores[-1]
    if pool == "reply_start":
        return readout.reply_start(kind=kind)
    raise EmolensError(f"unknown pooling '{pool}': choose from {', '.join(POOLS)}")


def read_many(
    lm: LoadedModel,
    bank: EmotionBank,
    items: Sequence[str | Sequence[dict]],
    *,
    layer: int | None = None,
    variant: str = "denoised",
    pool: str | None = "mean",
    kind: str = "projection",
    batch_size: int = 8,
    padding_side: str = "right",
    baseline: str | torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor | list[Readout]:
    """Read many texts or conversations in length-bucketed, padded batches: the same numbers
    as `read` on each, much faster. With `pool` ("mean", "last" or "reply_start", see
    `pooled`) returns [items, emotions] scores of `kind`; with `pool=None` the Readouts."""
    if pool is not None and pool not in POOLS:
        raise EmolensError(f"unknown pooling '{pool}': choose from {', '.join(POOLS)}")
    if kind not in KINDS:
        raise EmolensError(f"unknown score kind '{kind}': choose from {KINDS}")
    if not items:
        raise EmolensError("nothing to read: no texts given")
    layer = resolve_layer(lm, bank, layer)
    offset = resolve_baseline(lm, bank, baseline, layer, variant, pool or "mean")
    rendered = [_render(lm, item) for item in items]
    results: list = [None] * len(items)
    bar = tqdm(total=len(items), unit="text", desc="read", disable=not progress)
    with bar:
        for batch in plan_batches([r.ids for r in rendered], batch_size):
            input_ids, mask = pad([rendered[i].ids for i in batch], lm.pad_id, padding_side)
            states = residuals(lm, input_ids, mask, [layer])[layer]
            for row, i in enumerate(batch):
                real = mask[row].bool().to(states.device)
                readout = _readout(lm, bank, rendered[i], states[row][real], layer, variant, offset)
                results[i] = readout if pool is None else pooled(readout, pool, kind)
            bar.update(len(batch))
    return results if pool is None else torch.stack(results)


@dataclass
class GeneratedToken:
    """One generated token: its id, its text piece, its position in the whole sequence, and
    the projection [emotions] of its residual at the read layer."""

    id: int
    text: str
    position: int
    scores: torch.Tensor


def generate(
    lm: LoadedModel,
    bank: EmotionBank,
    messages: str | Sequence[dict],
    *,
    layer: int | None = None,
    variant: str = "denoised",
    baseline: str | torch.Tensor | None = None,
    **sampling: object,
) -> Iterator[GeneratedToken]:
    """Generate an assistant reply token by token, yielding each token with its readout.

    A string is one user message. `sampling` are the fields of `emolens.generation.Sampling`
    (max_new_tokens, temperature, top_p, seed; greedy by default). Steering applied to the
    model (a SteeringVector's `apply`) acts as usual. Stops at an end-of-sequence token (not
    yielded) or after max_new_tokens.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    layer = resolve_layer(lm, bank, layer)
    offset = resolve_baseline(lm, bank, baseline, layer, variant)
    options = Sampling(**sampling)  # type: ignore[arg-type]
    decoder = Decoder(lm, [layer])
    decoder.add(0, render(lm, messages, add_generation_prompt=True).ids, options)
    units = bank.matrix(layer, variant).to(lm.device, torch.float32)
    return _stream(decoder, layer, units, offset)


def _stream(
    decoder: Decoder, layer: int, units: torch.Tensor, offset: torch.Tensor | None
) -> Iterator[GeneratedToken]:
    while decoder.busy:
        for step in decoder.step():
            states = step.residuals[layer].float()  # on the read block's device
            scores = (states @ units.to(states.device).T).cpu()
            yield GeneratedToken(step.token, step.text, step.position,
                                 scores if offset is None else scores - offset)  # fmt: skip
