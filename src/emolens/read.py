"""Token-level emotion readout of text, chats and live generation (METHOD.md 3.6).

Reading is a projection of the residual stream at one layer onto the bank's unit vectors:
one forward pass that stops after that layer, then one [tokens, width] x [width, emotions]
matmul. Chats are rendered with the model's chat template (or the plain Human/Assistant
format) and every token is labelled with the role and turn it belongs to.
"""

from __future__ import annotations

import bisect
import html
import inspect
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from emolens.bank import EmotionBank
from emolens.capture import block_output, check_layers, residuals, special_ids
from emolens.errors import EmolensError
from emolens.figures import save_figure
from emolens.models import LoadedModel

ROLES = ("system", "user", "assistant")
KINDS = ("projection", "cosine")
_FINAL_PUNCTUATION = re.compile(r"[.!?]['\")\]]*$")


@dataclass
class Rendered:
    """A text or conversation as the model sees it, with who says each token.

    `roles[i]` is "system", "user" or "assistant" for a message's content, "text" for plain
    text, and "template" for scaffolding the template adds (headers, special tokens, a
    default system prompt the template injects). `turns[i]` is the message index (0 for
    plain text, -1 for template tokens). `offsets` are non-overlapping character spans, so
    `tokens[i] == text[start:end]`. `reply_starts` are the token indices where each assistant
    reply begins: the last token of the assistant header, including a trailing generation
    prompt.
    """

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    roles: list[str]
    turns: list[int]
    reply_starts: list[int]

    @property
    def tokens(self) -> list[str]:
        return [self.text[a:b] for a, b in self.offsets]


def render(
    lm: LoadedModel,
    text_or_messages: str | Sequence[dict],
    *,
    add_generation_prompt: bool | None = None,
) -> Rendered:
    """Tokenise a text or a list of {"role", "content"} messages, labelling each token.

    A conversation gets a generation prompt when `add_generation_prompt` is True, or (None)
    when it does not end with an assistant turn, so that the reply start can be read.
    """
    if isinstance(text_or_messages, str):
        text = text_or_messages
        ids, raw, offsets = _encode(lm, text, add_special_tokens=True)
        roles = ["text" if b > a else "template" for a, b in raw]
        turns = [0 if role == "text" else -1 for role in roles]
        return Rendered(text, ids, offsets, roles, turns, [])
    messages = check_messages(text_or_messages)
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    text = lm.format_chat(messages, add_generation_prompt=add_generation_prompt)
    spans = _content_spans(lm, messages, text, add_generation_prompt)
    ids, raw, offsets = _encode(lm, text, add_special_tokens=not lm.has_chat_template)
    owner = [-1] * len(text)
    for turn, (start, end) in enumerate(spans):
        owner[start:end] = [turn] * (end - start)
    turns = [max(owner[a:b], default=-1) for a, b in raw]
    roles = [messages[t]["role"] if t >= 0 else "template" for t in turns]
    reply_chars = [
        _reply_char(lm, messages, text, i, spans[i][0])
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    if add_generation_prompt:
        reply_chars.append(len(text) - 1)
    ends = [b for _, b in offsets]
    starts = [min(bisect.bisect_right(ends, c), len(ids) - 1) for c in reply_chars]
    return Rendered(text, ids, offsets, roles, turns, starts)


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """Validate a conversation: a non-empty list of {"role", "content"} dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise EmolensError("a conversation must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise EmolensError(f"message {i}: expected an object with role and content")
        if message.get("role") not in ROLES:
            raise EmolensError(
                f"message {i}: role {message.get('role')!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise EmolensError(f"message {i}: content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _encode(
    lm: LoadedModel, text: str, add_special_tokens: bool
) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Token ids, the tokenizer's character spans, and the same spans made non-overlapping."""
    try:
        encoded = lm.tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
    except NotImplementedError:
        raise EmolensError(
            f"{lm.name}: its tokenizer gives no character offsets (a fast tokenizer is needed)"
        ) from None
    raw = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    offsets, end = [], 0
    for a, b in raw:
        a = max(a, end)
        end = max(b, a)
        offsets.append((a, end))
    return list(encoded["input_ids"]), raw, offsets


def _content_spans(
    lm: LoadedModel, messages: list[dict], text: str, add_generation_prompt: bool
) -> list[tuple[int, int]]:
    """Character span of each message's content in the rendered `text`.

    The conversation is rendered once more with placeholder contents: what lies between the
    placeholders is the template's scaffolding (including any injected default system
    prompt). Walking the real text, each scaffold piece is skipped and the content is
    found right after it (its stripped form, if the template trims contents).
    """
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    skeleton = lm.format_chat(
        [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)],
        add_generation_prompt=add_generation_prompt,
    )
    spans, cursor, position = [], 0, 0
    for i, (message, mark) in enumerate(zip(messages, marks, strict=True)):
        found = skeleton.find(mark, position)
        if found >= 0:
            piece = skeleton[position:found]
            position = found + len(mark)
            if text.startswith(piece, cursor):
                cursor += len(piece)
        content = message["content"]
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise EmolensError(
                f"message {i}: the chat template of {lm.name} changes its content; "
                "cannot tell which tokens belong to it"
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def _reply_char(
    lm: LoadedModel, messages: list[dict], text: str, turn: int, content_start: int
) -> int:
    """Last character of the assistant header before message `turn`'s content.

    That is where a generation prompt would end: the ":" of a plain "Assistant:", or the
    last character of the chat template's assistant header.
    """
    try:
        prompt = lm.format_chat(messages[:turn], add_generation_prompt=True)
    except Exception:  # some templates refuse a conversation prefix
        prompt = ""
    if prompt and len(prompt) <= content_start and text.startswith(prompt):
        return len(prompt) - 1
    return max(content_start - 1, 0)


def resolve_layer(lm: LoadedModel, bank: EmotionBank, layer: int | None) -> int:
    """The layer to read (None: the bank's default), checked against the bank and model."""
    layer = bank.default_layer if layer is None else int(layer)
    bank.layer_index(layer)
    check_layers(lm, [layer])
    if bank.width != lm.width:
        raise EmolensError(f"bank vectors have width {bank.width}; {lm.name} has {lm.width}")
    if bank.model:
        bank.check_against(lm)
    return layer


def _check_length(lm: LoadedModel, n: int, what: str = "input") -> None:
    if n == 0:
        raise EmolensError("nothing to read: the input is empty")
    limit = lm.context_limit
    if limit and n > limit:
        raise EmolensError(f"{what} has {n} tokens; {lm.name} reads at most {limit}")


def project(
    lm: LoadedModel,
    bank: EmotionBank,
    ids: Sequence[int],
    *,
    layer: int | None = None,
    variant: str = "denoised",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection and cosine [tokens, emotions] of each token's residual at `layer`."""
    layer = resolve_layer(lm, bank, layer)
    _check_length(lm, len(ids))
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    acts = residuals(lm, input_ids, torch.ones_like(input_ids), [layer])[layer][0].float()
    matrix = bank.matrix(layer, variant).to(acts.device, torch.float32)
    projection = acts @ matrix.T
    cosine = projection / acts.norm(dim=-1, keepdim=True).clamp(min=1e-12)
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


def read(
    lm: LoadedModel,
    bank: EmotionBank,
    text_or_messages: str | Sequence[dict],
    *,
    layer: int | None = None,
    variant: str = "denoised",
) -> Readout:
    """Read every emotion of `bank` at every token of a text or a conversation.

    A string is read as plain text; a list of {"role", "content"} messages goes through the
    model's chat template (or the plain Human/Assistant format). A conversation that does
    not end with an assistant turn is read with the generation prompt appended, so that
    `reply_start()` gives the reading where the assistant's reply would begin.
    """
    layer = resolve_layer(lm, bank, layer)
    rendered = render(lm, text_or_messages)
    projection, cosine = project(lm, bank, rendered.ids, layer=layer, variant=variant)
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
    )


@dataclass
class GeneratedToken:
    """One generated token: its id, its text piece, its position in the whole sequence, and
    the projection [emotions] of its residual at the read layer."""

    id: int
    text: str
    position: int
    scores: torch.Tensor


class _Stop(Exception):
    """Raised by the readout hook when nothing past the read layer is needed."""


def generate(
    lm: LoadedModel,
    bank: EmotionBank,
    messages: str | Sequence[dict],
    *,
    max_new_tokens: int = 64,
    layer: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    variant: str = "denoised",
) -> Iterator[GeneratedToken]:
    """Generate an assistant reply token by token, yielding each token with its readout.

    A string is one user message. The prompt is encoded once and each step feeds only the
    new token with the KV cache; a forward hook on the read block takes the newest
    position's residual, so steering hooks on the model act as usual. Greedy when
    `temperature` is 0; stops at an end-of-sequence token (not yielded).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if max_new_tokens < 1:
        raise EmolensError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise EmolensError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    layer = resolve_layer(lm, bank, layer)
    prompt = render(lm, messages, add_generation_prompt=True)
    _check_length(lm, len(prompt.ids) + max_new_tokens, "prompt plus max_new_tokens")
    matrix = bank.matrix(layer, variant).to(lm.device, torch.float32)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return _stream(lm, prompt.ids, layer, matrix, max_new_tokens, temperature, top_p, generator)


@torch.inference_mode()
def _stream(
    lm: LoadedModel,
    ids: list[int],
    layer: int,
    matrix: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Iterator[GeneratedToken]:
    state: dict = {"stop": False}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        state["residual"] = block_output(output)[0, -1]
        if state["stop"]:
            raise _Stop

    eos = eos_ids(lm)
    options, cache = logits_options(lm), cache_keyword(lm)
    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True, **options)
        generated: list[int] = []
        shown = ""
        for step in range(max_new_tokens):
            token = pick(out.logits[0, -1], temperature, top_p, generator)
            if token in eos:
                return
            state["stop"] = step == max_new_tokens - 1
            try:
                out = lm.model(
                    input_ids=torch.tensor([[token]], device=lm.device),
                    use_cache=True,
                    **{cache: getattr(out, cache)},
                    **options,
                )
            except _Stop:
                pass
            generated.append(token)
            decoded, piece = lm.tokenizer.decode(generated, skip_special_tokens=False), ""
            if state["stop"] or not decoded.endswith("\ufffd"):  # else wait for the character
                piece, shown = decoded[len(shown) :], decoded
            residual = state["residual"].float()
            scores = (residual @ matrix.to(residual.device).T).cpu()
            yield GeneratedToken(token, piece, len(ids) + step, scores)
    finally:
        handle.remove()


def eos_ids(lm: LoadedModel) -> set[int]:
    """Every end-of-sequence id of the tokenizer and the generation config."""
    found = {lm.tokenizer.eos_token_id}
    config = getattr(lm.model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    found |= set(configured) if isinstance(configured, list) else {configured}
    return {int(i) for i in found if i is not None}


def cache_keyword(lm: LoadedModel) -> str:
    """The name of the KV cache in the model's forward and output ("cache" from transformers
    5.2x, "past_key_values" before)."""
    parameters = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def logits_options(lm: LoadedModel) -> dict:
    """Ask for the last position's logits only, where the model supports it."""
    parameters = inspect.signature(lm.model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


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


# --- Displays ------------------------------------------------------------------------------


def heatmap_html(readout: Readout, emotions: Sequence[str] | None = None, top: int = 5) -> str:
    """A self-contained HTML page: the text once per emotion, each token coloured by its
    scaled score (red positive, blue negative), with the top emotions in a tooltip.

    Without `emotions`, the emotion with the highest mean scaled score is shown.
    """
    scaled = readout.scaled()
    if not emotions:
        means = (scaled * readout.valid[:, None]).sum(0) / readout.valid.sum().clamp(min=1)
        emotions = [readout.emotions[int(means.argmax())]]
    tips = [
        html.escape(
            "\n".join(
                [f"{role} (turn {turn})" if turn >= 0 else role]
                + [f"{n}: {v:+.3f}" for n, v in readout.top(top, i)]
            )
        )
        for i, (role, turn) in enumerate(zip(readout.roles, readout.turns, strict=True))
    ]
    blocks = []
    for name in emotions:
        column = scaled[:, readout.emotion_index(name)]
        spans, previous_turn = [], None
        for i, (token, role, turn, tip) in enumerate(
            zip(readout.tokens, readout.roles, readout.turns, tips, strict=True)
        ):
            if turn != previous_turn and turn >= 0 and role != "text":
                spans.append(f'<span class="role">{html.escape(role)}</span>')
            previous_turn = turn
            value = float(column[i])
            colour = "220,50,47" if value >= 0 else "38,120,210"
            style = f"background:rgba({colour},{abs(value):.3f})"
            kind = "tpl" if role == "template" else "tok"
            spans.append(
                f'<span class="{kind}" style="{style}" title="{tip}">{html.escape(token)}</span>'
            )
        blocks.append(f'<h2>{html.escape(name)}</h2>\n<div class="text">{"".join(spans)}</div>')
    title = f"emolens readout, layer {readout.layer} ({readout.variant})"
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
        ".tpl{color:#999}.role{display:inline-block;margin:.6em .4em 0 0;padding:0 .3em;"
        "font-size:70%;background:#eee;border-radius:3px}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Red: the token reads positive on the emotion, blue: negative; intensity is the "
        "score scaled by its 99th-percentile magnitude over the text. Hover a token for its "
        "top emotions.</p>\n" + "\n".join(blocks) + "\n</body></html>\n"
    )


def plot_trajectory(
    readout: Readout, path: str | Path, emotions: Sequence[str] | None = None
) -> Path:
    """Plot the mean score per turn (per sentence for plain text), one line per emotion.

    Without `emotions`, the four that vary most along the text are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = readout.turn_means()
    if len(turns) > 1:
        values = torch.stack([t.scores for t in turns])
        labels = [f"{t.role[0].upper()}{t.turn}" for t in turns]
        roles, xlabel = [t.role for t in turns], "turn (S system, U user, A assistant)"
    else:
        segments = readout.segments()
        if not segments:
            raise EmolensError("nothing to plot: the readout has no text tokens")
        values = torch.stack([readout.segment_mean(s) for s in segments])
        labels = [str(i + 1) for i in range(len(segments))]
        roles, xlabel = [s.role for s in segments], "sentence"
    if not emotions:
        emotions = [readout.emotions[i] for i in values.std(0).topk(min(4, values.shape[1]))[1]]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(labels)), 4))
    x = list(range(len(labels)))
    for i, role in enumerate(roles):
        if role == "user":
            axes.axvspan(i - 0.5, i + 0.5, color="#eeeeee", zorder=0)
    for name in emotions:
        axes.plot(x, values[:, readout.emotion_index(name)].numpy(), marker="o", label=name)
    axes.set_xticks(x, labels, fontsize=8)
    axes.set_xlabel(xlabel + (", grey: user turns" if "user" in roles else ""))
    axes.set_ylabel(f"mean projection, layer {readout.layer}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


TRANSCRIPTS = Path(__file__).parent / "data" / "transcripts"


def shipped_transcripts() -> list[str]:
    """Names of the transcripts shipped with emolens (usable as `load_chat(name)`)."""
    return sorted(p.stem for p in TRANSCRIPTS.glob("*.json"))


def load_chat(path_or_name: str | Path) -> list[dict]:
    """A conversation from a JSON file (a list of {"role", "content"}), or a shipped one by name."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = TRANSCRIPTS / f"{path.name.removesuffix('.json')}.json"
        if path.parent != Path(".") or not shipped.is_file():
            raise EmolensError(
                f"{path}: no such conversation file or shipped transcript "
                f"(shipped: {', '.join(shipped_transcripts()) or 'none'})"
            )
        path = shipped
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EmolensError(f"{path}: not a readable JSON conversation ({error})") from None
    try:
        return check_messages(messages)
    except EmolensError as error:
        raise EmolensError(f"{path}: {error}") from None
