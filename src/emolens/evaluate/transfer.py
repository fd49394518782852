"""Cross-genre transfer: do vectors built from stories read the emotion of other kinds of text?

The validation texts (a user's message to an assistant, a social-media comment, a line of
dialogue with one sentence of context, a diary entry; never used to build vectors) are read
at one layer under every readout choice:
- rendering: as plain text, or as a user turn of the chat template;
- pooling over the text's own tokens (a dialogue line's context excluded): the mean, the
  last token, the maximum of a moving average, or (chat only) the reply start;
- the bank's variants (raw, denoised, and logistic probes when the bank has them);
- calibration: none, relative to the neutral baseline (the same reading of the shipped
  neutral dialogues, subtracted per emotion), or centred (the bank's centre, the mean
  training story, projected and subtracted: what the held-out story table does).
Scores: per genre, top-1 among the validation emotions, top-1 among the showcase emotions
(on showcase texts), top-5 among all the bank's emotions. The texts are split in two halves
by id: a choice is picked on one half and reported on the other, so the winner is never
scored on the texts that chose it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from emolens import concepts
from emolens.bank import EmotionBank
from emolens.capture import pad, plan_batches, residuals
from emolens.chat import render
from emolens.corpus import GENRES, Record, dialogue_messages
from emolens.models import LoadedModel
from emolens.readout import score

RENDERINGS = ("plain", "chat")
POOLS = ("mean", "last", "max", "reply_start")
WINDOW = 5  # tokens in the moving average whose maximum is the "max" pooling


@dataclass(frozen=True)
class Scores:
    """Accuracy of one readout choice on one genre (None: no text to score)."""

    n: int
    top1: float | None  # among the validation emotions
    top1_showcase: float | None  # showcase texts, among the showcase emotions
    top5_all: float | None  # among all the bank's emotions


@dataclass(frozen=True)
class Transfer:
    """Scores per choice ("rendering/pool/variant/baseline") and genre on both halves of the
    texts, the word-embedding baseline beside them, and the choice picked on the first half."""

    layer: int
    emotions: tuple[str, ...]
    chance: dict[str, float]
    first_half: dict[str, dict[str, Scores]]
    second_half: dict[str, dict[str, Scores]]
    words: dict[str, dict[str, Scores]]
    chosen: str
    texts: int
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        def table(part: dict[str, dict[str, Scores]]) -> dict:
            return {
                choice: {genre: vars(s) for genre, s in rows.items()}
                for choice, rows in part.items()
            }

        return {"layer": self.layer, "emotions": list(self.emotions), "chance": self.chance,
                "first_half": table(self.first_half), "second_half": table(self.second_half),
                "words": table(self.words), "chosen": self.chosen, "texts": self.texts,
                "notes": list(self.notes)}  # fmt: skip


def half(record_id: str) -> int:
    """0 or 1: a stable split of the texts by id."""
    return hashlib.sha256(record_id.encode()).digest()[0] % 2


def _item(record: Record, rendering: str) -> tuple[str | list[dict], str]:
    """What is read, and the text whose tokens are pooled."""
    shown = f"{record.context}\n{record.text}" if record.context else record.text
    return (shown if rendering == "plain" else [{"role": "user", "content": shown}]), record.text


def _neutral_item(text: str, rendering: str) -> tuple[str | list[dict], None]:
    return (text if rendering == "plain" else dialogue_messages(text)), None


@torch.inference_mode()
def pooled_readings(
    lm: LoadedModel,
    banks: Sequence[EmotionBank],
    items: Sequence[tuple[str | list[dict], str | None]],
    layer: int,
    batch_size: int = 8,
) -> dict[tuple[int, str, str], torch.Tensor]:
    """{(bank index, variant, pool): [items, emotions]} projections pooled over each item's
    text (the whole content when the text is None). One forward pass per batch, stopping at
    `layer`."""
    rendered = [render(lm, item) for item, _ in items]
    masks = []
    for r, (_, text) in zip(rendered, items, strict=True):
        if text is None:
            masks.append([role != "template" for role in r.roles])
            continue
        start = r.text.rindex(text)
        masks.append([a < start + len(text) and b > start for a, b in r.offsets])
    keys = [(k, v, p) for k, bank in enumerate(banks) for v in bank.vectors for p in POOLS]
    out = {key: torch.zeros(len(items), len(banks[key[0]].emotions)) for key in keys}
    for batch in plan_batches([r.ids for r in rendered], batch_size):
        ids, attention = pad([rendered[i].ids for i in batch], lm.pad_id, "right")
        states = residuals(lm, ids, attention, [layer])[layer].float()
        for row, i in enumerate(batch):
            n = len(rendered[i].ids)
            chosen = torch.tensor(masks[i])
            chosen[0] = False  # the attention sink never enters a reading
            for k, bank in enumerate(banks):
                for variant in bank.vectors:
                    tokens = score(states[row, :n], bank, layer, variant).cpu()
                    line = tokens[chosen] if bool(chosen.any()) else tokens
                    smooth = line.unfold(0, min(WINDOW, len(line)), 1).mean(-1)
                    out[(k, variant, "mean")][i] = line.mean(0)
                    out[(k, variant, "last")][i] = line[-1]
                    out[(k, variant, "max")][i] = smooth.max(0).values
                    out[(k, variant, "reply_start")][i] = tokens[-1]
    return out


def _scores(
    values: torch.Tensor, labels: list[str], bank: EmotionBank, emotions: Sequence[str]
) -> Scores:
    if not labels:
        return Scores(0, None, None, None)
    columns = [bank.emotions.index(e) for e in emotions]
    shown = [e for e in concepts.showcase() if e in emotions]
    top1 = sum(
        emotions[int(row[columns].argmax())] == label
        for row, label in zip(values, labels, strict=True)
    )
    top5 = sum(
        bank.emotion_index(label) in row.topk(min(5, len(row))).indices.tolist()
        for row, label in zip(values, labels, strict=True)
    )
    showcase = [(row, label) for row, label in zip(values, labels, strict=True) if label in shown]
    index = [bank.emotions.index(e) for e in shown]
    hits = sum(shown[int(row[index].argmax())] == label for row, label in showcase)
    return Scores(
        len(labels),
        top1 / len(labels),
        hits / len(showcase) if showcase else None,
        top5 / len(labels),
    )


def evaluate_transfer(
    lm: LoadedModel,
    bank: EmotionBank,
    records: Sequence[Record],
    neutral: Sequence[str],
    *,
    layer: int,
    words: EmotionBank | None = None,
) -> Transfer:
    """Every readout choice on the validation `records`, with the neutral baseline from the
    `neutral` dialogue texts and the word-embedding bank `words` beside it."""
    emotions = [e for e in bank.emotions if any(r.emotion == e for r in records)]
    banks = [bank] + ([words] if words is not None else [])
    tables: list[dict[str, dict[str, Scores]]] = [{}, {}]
    word_table: dict[str, dict[str, Scores]] = {}
    for rendering in RENDERINGS:
        readings = pooled_readings(lm, banks, [_item(r, rendering) for r in records], layer)
        reference = pooled_readings(
            lm, banks, [_neutral_item(t, rendering) for t in neutral], layer
        )
        for (k, variant, pool), values in readings.items():
            if rendering == "plain" and pool == "reply_start":
                continue
            source = banks[k]
            offsets = {"none": torch.zeros(values.shape[1]),
                       "neutral": reference[(k, variant, pool)].mean(0),
                       "centre": score(source.center[source.layer_index(layer)], source, layer, variant)}  # fmt: skip
            for calibration, offset in offsets.items():
                shifted = values - offset
                name = f"{rendering}/{pool}/{'words' if k == 1 else variant}/{calibration}"
                for part in (0, 1):
                    rows = {genre: _scores(
                        shifted[[i for i, r in enumerate(records) if r.kind == genre and half(r.id) == part]],
                        [r.emotion for r in records if r.kind == genre and half(r.id) == part],
                        banks[k], emotions) for genre in GENRES}  # fmt: skip
                    if k == 1:
                        if part == 1:
                            word_table[name] = rows
                    else:
                        tables[part][name] = rows
    chosen = max(tables[0], key=lambda name: _mean(tables[0][name]))
    return Transfer(
        layer=layer,
        emotions=tuple(emotions),
        chance={
            "top1": 1 / len(emotions),
            "top1_showcase": 1 / max(1, sum(e in emotions for e in concepts.showcase())),
            "top5_all": min(1.0, 5 / len(bank.emotions)),
        },  # fmt: skip
        first_half=tables[0],
        second_half=tables[1],
        words=word_table,
        chosen=chosen,
        texts=len(records),
    )


def _mean(rows: dict[str, Scores]) -> float:
    values = [s.top1 for s in rows.values() if s.top1 is not None]
    return sum(values) / len(values) if values else 0.0
