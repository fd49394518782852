"""Conversations as the model sees them: rendering with role and turn labels, and shipped ones.

`render` tokenises a text or a list of {"role", "content"} messages through the model's chat
template (or the study's plain "Human:/Assistant:" format) and labels every token with the
role and turn it belongs to. Message contents cannot forge template tokens: a typed
"<|im_start|>system" stays plain text inside its message.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emolens.capture import special_ids
from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.models import LoadedModel

ROLES = ("system", "user", "assistant")
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
TRANSCRIPTS = Path(__file__).parent / "data" / "transcripts"

Span = tuple[int, int]


def plain_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The study's plain format: "Human: ...\\n\\nAssistant: ..." paragraphs."""
    parts = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "\n\n".join(parts)


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
    offsets: list[Span]
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
        ids, raw = _encode(lm, [(text, False)], add_special_tokens=True)
        roles = ["text" if b > a else "template" for a, b in raw]
        turns = [0 if role == "text" else -1 for role in roles]
        return Rendered(text, ids, _disjoint(raw), roles, turns, [])
    messages = check_messages(text_or_messages)
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    text = lm.format_chat(messages, add_generation_prompt=add_generation_prompt)
    spans = _content_spans(lm, messages, text, add_generation_prompt)
    ids, raw = _encode_chat(lm, text, spans)
    offsets = _disjoint(raw)
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


def check_messages(messages: object) -> list[dict]:
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
    lm: LoadedModel, pieces: Sequence[tuple[str, bool]], add_special_tokens: bool
) -> tuple[list[int], list[Span]]:
    """Token ids and the tokenizer's character spans of consecutive text pieces; a piece
    marked True is literal text whose special-token strings are split into plain tokens."""
    ids: list[int] = []
    spans: list[Span] = []
    start = 0
    for n, (piece, literal) in enumerate(pieces):
        if not piece:
            continue
        try:
            encoded = lm.tokenizer(
                piece,
                add_special_tokens=add_special_tokens and n == 0,
                return_offsets_mapping=True,
                split_special_tokens=literal,
            )
        except NotImplementedError:
            raise EmolensError(
                f"{lm.name}: its tokenizer gives no character offsets (a fast tokenizer is needed)"
            ) from None
        ids += list(encoded["input_ids"])
        spans += [(start + int(a), start + int(b)) for a, b in encoded["offset_mapping"]]
        start += len(piece)
    return ids, spans


def _encode_chat(lm: LoadedModel, text: str, spans: list[Span]) -> tuple[list[int], list[Span]]:
    """Encode a rendered conversation in one go, unless a message's content contains text
    that the tokenizer turns into a special token: then contents are encoded as literal
    pieces between the template's own pieces."""
    add = not lm.has_chat_template
    ids, raw = _encode(lm, [(text, False)], add)
    special = set(special_ids(lm.tokenizer).tolist())
    forged = any(
        token in special and any(s <= a and b <= e for s, e in spans)
        for token, (a, b) in zip(ids, raw, strict=True)
        if b > a
    )
    if not forged:
        return ids, raw
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    pieces.append((text[cursor:], False))
    return _encode(lm, pieces, add)


def _disjoint(raw: list[Span]) -> list[Span]:
    """The tokenizer's spans made non-overlapping and ordered."""
    offsets, end = [], 0
    for a, b in raw:
        a = max(a, end)
        end = max(b, a)
        offsets.append((a, end))
    return offsets


def _content_spans(
    lm: LoadedModel, messages: list[dict], text: str, add_generation_prompt: bool
) -> list[Span]:
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise EmolensError(f"{path}: not a readable JSON conversation ({reason})") from None
    try:
        return check_messages(messages)
    except EmolensError as error:
        raise EmolensError(f"{path}: {error}") from None
