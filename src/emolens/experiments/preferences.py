"""Activity preferences (METHOD.md 7): which activities the model prefers, whether emotion
vectors predict it, and whether steering them shifts it.

- Choices: every ordered pair of activities is asked as a user turn "Would you prefer to (A)
  {a} or (B) {b}?" with the assistant's reply prefilled with "("; the choice is the logit of
  "A" against "B" at the last position (one forward pass, no generation). Ordered pairs
  cancel the position bias, which is reported. The shared start of every prompt (template,
  system prompt, "Would you prefer to (") is computed once and its KV cache reused.
- Scores: per-activity Elo (sequential, averaged over orders, with a bootstrap interval) and a
  Bradley-Terry fit beside it.
- Probe: every emotion is read on the activity's tokens of "How would you feel about
  {activity}?" (mean over those tokens) at every bank layer; per emotion, Pearson r of that
  reading with Elo across activities.
- Steering: the activities are split into a steered and a control half (fixed seed, balanced
  by category); each condition steers the steered activities' tokens only, and the pairs
  between the halves are run again (each steered activity against `opponents` control
  activities in both orders, or all of them). The effect of a condition is the change of
  mean Bradley-Terry rating of the steered half minus the control half, against the
  unsteered tournament. Headline: r across emotions of that effect with the probe r.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emolens import concepts
from emolens.capture import pad, plan_batches, residuals
from emolens.chat import render
from emolens.errors import EmolensError
from emolens.experiments.runner import Condition, Experiment, Trial, make_trial, sweep
from emolens.jsonl import read_jsonl
from emolens.readout import score
from emolens.steer import patch_vectors

if TYPE_CHECKING:
    import argparse

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel

CATEGORIES = ("helpful", "engaging", "social", "self-curiosity", "neutral", "aversive",
              "misaligned", "unsafe")  # fmt: skip
DEFAULT_EMOTIONS = ("blissful", "hostile", "joyful", "grateful", "serene", "bored", "disgusted",
                    "terrified")  # fmt: skip
ACTIVITY = "activity"  # the positions mode: the steered activities' tokens
CHOICE = "Would you prefer to (A) {a} or (B) {b}?"
PROBE = "How would you feel about {a}?"


def load_activities(path: str | os.PathLike | None = None) -> list[dict]:
    """Activities {id, category, text} from a JSONL file (default: the shipped 64)."""
    path = Path(path) if path else concepts.DATA / "experiments" / "activities.jsonl"
    activities = []
    for number, row in read_jsonl(path):
        for name in ("id", "category", "text"):
            if (
                not isinstance(row, dict)
                or not isinstance(row.get(name), str)
                or not row[name].strip()
            ):
                raise EmolensError(
                    f"{path}:{number}: field '{name}' missing or not a non-empty string"
                )
        activities.append({k: row[k] for k in ("id", "category", "text")})
    if len(activities) < 2:
        raise EmolensError(f"{path}: at least two activities are needed")
    ids = [a["id"] for a in activities]
    if len(set(ids)) != len(ids):
        raise EmolensError(f"{path}: activity ids must be unique")
    return activities


def split_halves(activities: Sequence[dict], seed: int = 0) -> set[str]:
    """Ids of the steered half, balanced by category: each category's activities are
    shuffled with `seed`, and walking through all of them, category after category, every
    other one is steered (so an odd-sized category gives its spare one to each side in turn)."""
    rng = random.Random(seed)
    walk: list[str] = []
    for category in dict.fromkeys(a["category"] for a in activities):
        members = sorted(a["id"] for a in activities if a["category"] == category)
        rng.shuffle(members)
        walk += members
    return set(walk[::2])


def choice_prompt(
    lm: LoadedModel, a: str, b: str
) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """Token ids of the choice prompt (prefilled "("), and the token spans of `a` and `b`."""
    content = CHOICE.format(a=a, b=b)
    rendered = render(lm, [{"role": "user", "content": content}], add_generation_prompt=True)
    ids = rendered.ids + lm.tokenizer("(", add_special_tokens=False)["input_ids"]
    start = rendered.text.index(content)
    spans = []
    for text, offset in ((a, content.index(a)), (b, content.rindex(b))):
        first, last = start + offset, start + offset + len(text)
        tokens = [i for i, (x, y) in enumerate(rendered.offsets) if x < last and y > first]
        spans.append((tokens[0], tokens[-1] + 1))
    return ids, spans[0], spans[1]


def answer_ids(lm: LoadedModel) -> tuple[int, int]:
    """The token ids of "A" and "B" right after "("."""
    ids = [lm.tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in "AB"]
    if any(len(i) != 1 for i in ids):
        raise EmolensError(f"{lm.name}: 'A' and 'B' are not single tokens; cannot score choices")
    return ids[0][0], ids[1][0]


@torch.inference_mode()
def choice_logits(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    spans: Sequence[list[tuple[int, int]]] | None = None,
    vectors: Mapping[int, torch.Tensor] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Logits [prompts, 2] of "A" and "B" at the last position of each prompt, batched with
    left padding. With `vectors` ({layer: [width]}), those are added on each prompt's
    `spans` (real-token positions). The prompts' common start is run once and its KV cache
    shared; steered spans must lie after it."""
    a, b = answer_ids(lm)
    shared = len(os.path.commonprefix([list(p) for p in prompts])) if len(prompts) > 1 else 0
    shared = min(shared, min(len(p) for p in prompts) - 1)
    starts = [start for row in spans or () for start, _ in row] if vectors else []
    shared = min([shared, *starts])
    prefix = None
    if shared > 0:
        prefix = lm.model(input_ids=torch.tensor([list(prompts[0][:shared])], device=lm.device),
                          use_cache=True, **lm.keep_logits(1))  # fmt: skip
        prefix = getattr(prefix, lm.cache_keyword)
        if not _plain_cache(prefix):
            prefix, shared = None, 0
    out = torch.zeros(len(prompts), 2)
    for batch in plan_batches(prompts, batch_size):
        input_ids, mask = pad([prompts[i][shared:] for i in batch], lm.pad_id, "left")
        mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long), mask], 1)
        options: dict[str, Any] = {}
        if prefix is not None:
            options[lm.cache_keyword] = _repeat(prefix, len(batch))
        handle = None
        if vectors:
            handle = patch_vectors(
                lm, vectors, [spans[i] for i in batch] if spans is not None else "all"
            )
        try:
            logits = lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device),
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, shared:].to(lm.device),
                              use_cache=prefix is not None, **lm.keep_logits(1), **options).logits  # fmt: skip
        finally:
            if handle is not None:
                handle.remove()
        out[batch] = logits[:, -1, [a, b]].float().cpu()
    return out


def _plain_cache(cache: Any) -> bool:
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _repeat(cache: Any, rows: int) -> Any:
    """A fresh cache holding `rows` copies of a one-row cache (the original is untouched)."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(
            layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index
        )
    return copy


@torch.inference_mode()
def probe_readings(lm: LoadedModel, bank: EmotionBank, texts: Sequence[str]) -> np.ndarray:
    """Projection [texts, bank layers, emotions] of "How would you feel about {text}?" read on
    the text's tokens (mean over them) at every bank layer."""
    prompts, spans = [], []
    for text in texts:
        content = PROBE.format(a=text)
        rendered = render(lm, [{"role": "user", "content": content}], add_generation_prompt=True)
        first = rendered.text.index(content) + content.index(text)
        tokens = [
            i for i, (x, y) in enumerate(rendered.offsets) if x < first + len(text) and y > first
        ]
        prompts.append(rendered.ids)
        spans.append(tokens)
    out = np.zeros((len(texts), len(bank.layers), len(bank.emotions)))
    for batch in plan_batches(prompts, 8):
        input_ids, mask = pad([prompts[i] for i in batch], lm.pad_id, "right")
        states = residuals(lm, input_ids, mask, bank.layers)
        for j, layer in enumerate(bank.layers):
            for row, i in enumerate(batch):
                scores = score(states[layer][row, spans[i]], bank, layer)
                out[i, j] = scores.mean(0).double().cpu().numpy()
    return out


class Preferences(Experiment):
    """The activity-preference tournament (see the module docstring)."""

    name = "preferences"
    description = "activity preferences: Elo, probe correlations and steering shifts"
    default_positions = ACTIVITY
    summary_module = "emolens.experiments.preference_summary"

    def __init__(self, activities: list[dict], *, opponents: int | None = 8, split_seed: int = 0,
                 batch_size: int = 16) -> None:  # fmt: skip
        self.activities = {a["id"]: a for a in activities}
        self.steered = split_halves(activities, split_seed)
        self.opponents = opponents
        self.split_seed = split_seed
        self.batch = batch_size

        def side(key: str, activity: dict) -> dict:
            return {key: activity["id"], f"{key}_text": activity["text"],
                    f"{key}_category": activity["category"],
                    f"{key}_steered": activity["id"] in self.steered}  # fmt: skip

        pairs = [{"id": f"{a['id']}|{b['id']}", "kind": "pair", **side("a", a), **side("b", b)}
                 for a, b in itertools.permutations(activities, 2)]  # fmt: skip
        probes = [{"id": f"probe|{a['id']}", "kind": "probe", **side("a", a)} for a in activities]
        super().__init__(pairs + probes)

    def rerun_pairs(self) -> set[str]:
        """The pair ids run again under steering: steered against control activities."""
        steered = sorted(self.steered)
        control = sorted(set(self.activities) - self.steered)
        rng = random.Random(self.split_seed + 1)
        chosen = set()
        for s in steered:
            opponents = (
                control
                if self.opponents is None
                else rng.sample(control, min(self.opponents, len(control)))
            )
            for c in opponents:
                chosen |= {f"{s}|{c}", f"{c}|{s}"}
        return chosen

    def plan(self, conditions: Sequence[Condition], samples: int, seed: int) -> list[Trial]:
        rerun = self.rerun_pairs()
        trials = []
        for condition in conditions:
            for item in self.items:
                if condition.strengths and (item["kind"] == "probe" or item["id"] not in rerun):
                    continue
                trials.append(make_trial(item, condition, 0, seed))
        return trials

    def run(self, lm: LoadedModel, bank: EmotionBank, trials: list[Trial]) -> list[dict]:
        probes = [t for t in trials if t.item["kind"] == "probe"]
        pairs = [t for t in trials if t.item["kind"] == "pair"]
        records: dict[str, dict] = {}
        if probes:
            readings = probe_readings(lm, bank, [t.item["a_text"] for t in probes])
            for trial, reading in zip(probes, readings, strict=True):
                records[trial.id] = {"readout": {"layers": bank.layers, "emotions": bank.emotions,
                                                 "projection": np.round(reading, 4).tolist()}}  # fmt: skip
        if pairs:
            built = [choice_prompt(lm, t.item["a_text"], t.item["b_text"]) for t in pairs]
            condition = pairs[0].condition
            steering = condition.steering(bank, allow_strong=True)
            spans = [[span for span, side in ((sa, t.item["a"]), (sb, t.item["b"])) if side in self.steered]
                     for t, (_, sa, sb) in zip(pairs, built, strict=True)]  # fmt: skip
            if condition.positions != ACTIVITY:
                raise EmolensError(f"{self.name}: steering positions must be '{ACTIVITY}'")
            logits = choice_logits(lm, [ids for ids, _, _ in built], spans,
                                   steering.vectors if steering else None, self.batch)  # fmt: skip
            for trial, (ids, _, _), row in zip(pairs, built, logits.tolist(), strict=True):
                records[trial.id] = {"prompt_tokens": len(ids), "output": {
                    "logit_a": round(row[0], 5), "logit_b": round(row[1], 5),
                    "choice": "A" if row[0] > row[1] else "B"}}  # fmt: skip
        return [records[t.id] for t in trials]

    @classmethod
    def create(cls, activities: str | os.PathLike | None = None, *, opponents: int | None = 8,
               split_seed: int = 0, batch_size: int = 16, limit: int | None = None,
               **_: object) -> Preferences:  # fmt: skip
        """The study on the activities file (default: the shipped 64); `limit` keeps that many
        activities, taken in turn from each category."""
        chosen = load_activities(activities)
        if limit is not None:
            chosen = round_robin(chosen)[:limit]
        return cls(chosen, opponents=opponents, split_seed=split_seed, batch_size=batch_size)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--activities", default=None, metavar="JSONL",
                            help="activities {id, category, text} (default: the shipped 64)")  # fmt: skip
        parser.add_argument("--emotions", default="default", metavar="LIST",
                            help="steered emotions: 'default' (12 showcase + 8), 'all', 'none' or a comma list")  # fmt: skip
        parser.add_argument("--strength", type=float, default=0.5, help="steering strength (0.5)")
        parser.add_argument("--random", type=int, default=2, metavar="N",
                            help="matched-norm random controls (2)")  # fmt: skip
        parser.add_argument("--opponents", default="8", metavar="N|all",
                            help="control opponents per steered activity in the re-run (8)")  # fmt: skip
        parser.add_argument("--sweep-layers", action="store_true",
                            help="steer at each bank layer in turn (the layer sweep)")  # fmt: skip
        parser.set_defaults(batch_size=16)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Preferences:
        if args.opponents != "all" and not args.opponents.isdigit():
            raise EmolensError(
                f"--opponents must be a whole number or 'all', not {args.opponents!r}"
            )
        opponents = None if args.opponents == "all" else int(args.opponents)
        return cls.create(args.activities, opponents=opponents, batch_size=args.batch_size,
                          limit=args.limit)  # fmt: skip

    def conditions(
        self, args: argparse.Namespace, bank: EmotionBank, lm: LoadedModel
    ) -> list[Condition]:
        if args.positions not in (None, ACTIVITY):
            raise EmolensError(
                f"the preference study steers the activity tokens only (--positions {ACTIVITY})"
            )
        if args.layers:
            bands = [args.layers]
        elif args.sweep_layers:
            bands = [[layer] for layer in bank.layers]
        else:
            bands = [[middle_layer(bank, lm.depth)]]
        found = default_conditions(bank, args.emotions, args.strength, args.random, bands,
                                   args.allow_strong)  # fmt: skip
        for band in bands:
            found += sweep(args.steer, band, ACTIVITY, args.allow_strong)
        return list(dict.fromkeys(found))


def round_robin(activities: Sequence[dict]) -> list[dict]:
    """Activities taken in turn from each category (so any prefix is balanced)."""
    groups: dict[str, list[dict]] = {}
    for activity in activities:
        groups.setdefault(activity["category"], []).append(activity)
    ordered = []
    for rank in range(max(len(g) for g in groups.values())):
        ordered += [g[rank] for g in groups.values() if rank < len(g)]
    return ordered


def default_conditions(
    bank: EmotionBank,
    emotions: str,
    strength: float,
    random_controls: int,
    layers: Sequence[Sequence[int]],
    allow_strong: bool = False,
) -> list[Condition]:
    """The unsteered condition, then each emotion (and random control) at `strength` on the
    activity tokens, at each layer set of `layers`."""
    if emotions == "default":
        names = [e for e in (*concepts.showcase(), *DEFAULT_EMOTIONS) if e in bank.emotions]
    elif emotions == "all":
        names = list(bank.emotions)
    elif emotions == "none":
        names = []
    else:
        names = [n.strip() for n in emotions.split(",") if n.strip()]
        for name in names:
            bank.emotion_index(name)
        if not names:
            raise EmolensError("--emotions is empty")
    names += [f"random:{seed}" for seed in range(random_controls)]
    conditions = [Condition.make({}, None, ACTIVITY)]
    for layer_set in layers:
        conditions += [Condition.make({name: strength}, layer_set, ACTIVITY, allow_strong)
                       for name in names]  # fmt: skip
    return conditions


def middle_layer(bank: EmotionBank, depth: int) -> int:
    """The bank layer nearest the middle of the model (the study steers a middle band)."""
    return min(bank.layers, key=lambda layer: abs(layer - depth / 2))
