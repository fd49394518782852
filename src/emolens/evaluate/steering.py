"""Steering validation (METHOD.md 5): does adding an emotion vector make its own word likelier?

For each emotion and each strength of a dose range, the vector is added at every position
and the log-probability of every candidate word (" afraid", " angry", ...; all tokens of a
word, summed) is read after two probes: "How does he feel? He feels" (plain text) and the
chat "How do you feel?" answered with "I feel". Seeded random directions of the same norm
are the control. Text quality is measured as the perplexity, under the unsteered model, of
short greedy replies generated with steering: the strength at which it passes a multiple of
the unsteered perplexity is where text degrades.

Cost: one forward per (probe, strength) scores every word for every steered direction at
once: the directions are batch rows (one steering vector per row), and the words are packed
after the probe with a 4D attention mask so that each word sees the probe and itself only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from emolens.bank import EmotionBank
from emolens.errors import EmolensError
from emolens.generation import Sampling, decode
from emolens.models import LoadedModel
from emolens.readout import resolve_layer
from emolens.steer import RANDOM_PREFIX, SteeringVector, random_direction, steer_vectors

STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
GENERATION_PROMPTS = (
    "Tell me about your morning.",
    "What do you think about when you look at the sea?",
)


@dataclass(frozen=True)
class SteeringSettings:
    """What the evaluation tries: `strengths` (fractions of the layer's mean residual norm; 0
    is added), `n_random` seeded random directions, greedy replies of `max_new_tokens` to the
    `generation_prompts`; the headline count is read at the strength nearest `reference`, and
    text degrades where perplexity passes `degrade_factor` x unsteered."""

    strengths: tuple[float, ...] = STRENGTHS
    n_random: int = 3
    generation_prompts: tuple[str, ...] = GENERATION_PROMPTS
    max_new_tokens: int = 12
    reference: float = 0.1
    degrade_factor: float = 2.0

    def __post_init__(self) -> None:
        if not all(math.isfinite(s) and s >= 0 for s in self.strengths):
            raise EmolensError(
                f"strengths must be finite and >= 0 (a dose range), not {list(self.strengths)}"
            )
        if self.n_random < 1 or self.max_new_tokens < 1:
            raise EmolensError("need n_random >= 1 and max_new_tokens >= 1")
        if not self.generation_prompts:
            raise EmolensError("need at least one generation prompt")


DEFAULT_SETTINGS = SteeringSettings()


@dataclass(frozen=True)
class DoseResponse:
    """Per strength, the change in log-probability of an emotion's own word under its vector,
    of the other words (mean), and of its own word under the random directions (mean, max)."""

    own: list[float]
    other: list[float]
    random: list[float]
    random_max: list[float]


@dataclass(frozen=True)
class Wins:
    """How many of `of` emotions win a comparison at each strength."""

    of: int
    per_strength: dict[float, int]


@dataclass(frozen=True)
class Perplexity:
    """Perplexity under the unsteered model of steered greedy replies, per strength: the mean
    over the emotions and over the random directions, each direction's, and the emotions'
    mean over the unsteered perplexity (`ratio`)."""

    unsteered: float
    emotions: list[float]
    random: list[float]
    per_direction: dict[str, list[float]]
    ratio: list[float]


@dataclass(frozen=True)
class Examples:
    """Replies to the first generation prompt: unsteered, and per direction and strength."""

    prompt: str
    unsteered: str
    steered: dict[str, dict[str, str]]


@dataclass(frozen=True)
class SteeringResult:
    """Dose-response of steering on emotion words, against random directions, with the
    perplexity of steered text (see the module docstring). `delta` holds the change of every
    word's log-probability, per probe and direction, over the strengths; `beats_random`
    counts emotions whose own word gains more than under any random direction, `specific`
    those whose own word gains more than the other words; `degrades_at` is the first
    strength whose ratio passes `degrade_factor` (None if none does)."""

    model: str
    layer: int
    variant: str
    norm: float
    strengths: list[float]
    emotions: list[str]
    random: list[str]
    probes: dict[str, str]
    baseline: dict[str, dict[str, float]]
    delta: dict[str, dict[str, dict[str, list[float]]]]
    summary: dict[str, DoseResponse]
    reference: float
    beats_random: Wins
    specific: Wins
    perplexity: Perplexity
    degrades_at: float | None
    degrade_factor: float
    examples: Examples
    seconds: float

    @property
    def beats_random_at_reference(self) -> int:
        """Emotions whose own word beats every random direction at the reference strength."""
        return self.beats_random.per_strength.get(self.reference, 0)

    def to_json(self) -> dict:
        data = asdict(self)
        data["beats_random"] = {
            "reference": data.pop("reference"),
            "count": self.beats_random_at_reference,
            **_wins_json(self.beats_random),
        }
        data["specific"] = _wins_json(self.specific)
        return data


def _wins_json(wins: Wins) -> dict:
    return {"of": wins.of, "per_strength": {str(s): n for s, n in wins.per_strength.items()}}


def probe_ids(lm: LoadedModel) -> dict[str, tuple[str, list[int]]]:
    """The two probes, each as (text, token ids): "he" in plain text, "I" through the chat
    template (the user asks, the assistant's reply begins "I feel")."""
    he = "How does he feel? He feels"
    messages = [{"role": "user", "content": "How do you feel?"}]
    chat = lm.format_chat(messages)
    reply = "I feel" if chat[-1:].isspace() else " I feel"
    ids = lm.encode_chat(messages) + lm.tokenizer(reply, add_special_tokens=False)["input_ids"]
    return {
        "he": (he, lm.tokenizer(he, add_special_tokens=True)["input_ids"]),
        "I": (chat + reply, ids),
    }


@torch.inference_mode()
def word_logprobs(
    lm: LoadedModel, ids: Sequence[int], words: Sequence[str], rows: int = 1
) -> torch.Tensor:
    """log P(" word" | ids), all tokens of each word summed, [rows, words] in float64.

    One forward: the words are packed after the prompt, each attending to the prompt and to
    its own earlier tokens, with the positions it would have after the prompt. `rows` repeats
    the prompt so that per-row steering vectors score several directions at once.
    """
    attention = getattr(lm.model.config, "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "eager"):
        raise EmolensError(
            f"{lm.name}: word scoring packs words with a 4D mask, which needs sdpa or eager "
            f"attention (the model uses {attention})"
        )
    pieces = [lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in words]
    if not ids or any(not piece for piece in pieces):
        raise EmolensError("word scoring needs a non-empty prompt and non-empty words")
    prompt = len(ids)
    total = prompt + sum(len(piece) for piece in pieces)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    sequence, positions, sources, targets = list(ids), list(range(prompt)), [], []
    start = prompt
    for piece in pieces:
        n = len(piece)
        allowed[start : start + n, :prompt] = True
        allowed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        sequence += piece
        positions += range(prompt, prompt + n)
        sources.append([prompt - 1] + list(range(start, start + n - 1)))
        targets.append(piece)
        start += n
    dtype = next(lm.model.parameters()).dtype
    mask = torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    keep = total - prompt + 1  # logits from the last prompt token on
    logits = lm.model(
        input_ids=torch.tensor([sequence] * rows, device=lm.device),
        attention_mask=mask[None, None].expand(rows, 1, total, total).to(lm.device),
        position_ids=torch.tensor([positions] * rows, device=lm.device),
        use_cache=False,
        **lm.keep_logits(keep),
    ).logits[:, -keep:]
    logprobs = torch.log_softmax(logits.double(), dim=-1).cpu()
    offset = prompt - 1
    out = torch.zeros(rows, len(words), dtype=torch.float64)
    for w, (source, target) in enumerate(zip(sources, targets, strict=True)):
        for s, t in zip(source, target, strict=True):
            out[:, w] += logprobs[:, s - offset, t]
    return out


def generate_rows(
    lm: LoadedModel,
    ids: Sequence[int],
    vectors: dict[int, torch.Tensor] | None,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of one prompt, one row per steering vector ({layer: [rows, width]},
    or None for one unsteered row): new tokens [rows, n] and a mask [rows, n] that ends with
    each row's end-of-sequence token."""
    rows = 1 if vectors is None else next(iter(vectors.values())).shape[0]
    steering = [None] if vectors is None else [
        SteeringVector({layer: v[r] for layer, v in vectors.items()}) for r in range(rows)
    ]  # fmt: skip
    done = decode(lm, [ids] * rows, Sampling(max_new_tokens), steering=steering)
    tokens = [g.tokens + ([g.stop_token] if g.stop_token is not None else []) for g in done]
    width = max(1, max(len(t) for t in tokens))
    generated = torch.full((rows, width), lm.pad_id, dtype=torch.long)
    alive = torch.zeros(rows, width, dtype=torch.bool)
    for r, row in enumerate(tokens):
        generated[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        alive[r, : len(row)] = True
    return generated, alive


@torch.inference_mode()
def sequence_nll(
    lm: LoadedModel, ids: Sequence[int], generated: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood [rows] of `generated` after `ids` (masked by `alive`).

    The prompt runs once; its KV cache is repeated for the rows, which then feed only their
    own tokens.
    """
    rows, n = generated.shape
    keyword = lm.cache_keyword
    prompt = torch.tensor([list(ids)], device=lm.device)
    out = lm.model(input_ids=prompt, use_cache=True, **lm.keep_logits(1))
    first = out.logits[:, -1:].expand(rows, 1, -1)
    if n > 1:
        cache = getattr(out, keyword)
        cache.batch_repeat_interleave(rows)
        rest = lm.model(
            input_ids=generated[:, :-1].to(lm.device), use_cache=True, **{keyword: cache}
        ).logits
        first = torch.cat([first, rest], 1)
    logprobs = torch.log_softmax(first.double(), dim=-1).cpu()
    picked = logprobs.gather(-1, generated[..., None])[..., 0]
    return -(picked * alive).sum(1)


def evaluate_steering(
    lm: LoadedModel,
    bank: EmotionBank,
    settings: SteeringSettings = DEFAULT_SETTINGS,
    *,
    emotions: Sequence[str] | None = None,
    layer: int | None = None,
    variant: str = "denoised",
) -> SteeringResult:
    """Steer each emotion of `emotions` (default: the showcase emotions the bank has; they are
    also the candidate words) at `layer` as `settings` say.

    The headline count compares, at the strength nearest `settings.reference`, each emotion's
    own-word change with the largest change any random direction makes to that word.
    """
    start = time.perf_counter()
    layer = resolve_layer(lm, bank, layer)
    emotions = _emotions(bank, emotions)
    strengths = sorted({0.0, *(float(s) for s in settings.strengths)})
    n_random = settings.n_random
    randoms = [f"{RANDOM_PREFIX}{seed}" for seed in range(n_random)]
    names = emotions + randoms
    units = torch.stack(
        [bank.vector(name, layer, variant) for name in emotions]
        + [random_direction(bank.width, seed) for seed in range(n_random)]
    )
    norm = bank.norm_at(layer)

    probes = probe_ids(lm)
    baseline, delta = {}, {}
    for probe, (_, ids) in probes.items():
        base = word_logprobs(lm, ids, emotions)[0]
        changes = [torch.zeros(len(names), len(emotions), dtype=torch.float64)]
        for strength in strengths[1:]:
            with steer_vectors(lm, {layer: strength * norm * units}):
                changes.append(word_logprobs(lm, ids, emotions, rows=len(names)) - base)
        baseline[probe] = base
        delta[probe] = torch.stack(changes, -1)  # [direction, word, strength]
    mean_delta = torch.stack(list(delta.values())).mean(0)

    summary, own_wins, specific = {}, [], []
    for e, name in enumerate(emotions):
        own = mean_delta[e, e]
        others = torch.cat([mean_delta[e, :e], mean_delta[e, e + 1 :]]).mean(0)
        random = mean_delta[len(emotions) :, e]
        summary[name] = DoseResponse(
            own=_floats(own),
            other=_floats(others),
            random=_floats(random.mean(0)),
            random_max=_floats(random.max(0).values),
        )
        own_wins.append(own > random.max(0).values)
        specific.append(own > others)
    wins, specific_count = torch.stack(own_wins).sum(0), torch.stack(specific).sum(0)
    nonzero = strengths[1:]
    ref = min(nonzero, key=lambda s: abs(s - settings.reference)) if nonzero else 0.0

    perplexity, examples = _perplexity(lm, layer, norm, units, names, strengths, settings)
    degraded = [s for s, r in zip(strengths, perplexity.ratio, strict=True)
                if r > settings.degrade_factor]  # fmt: skip
    return SteeringResult(
        model=lm.name,
        layer=layer,
        variant=variant,
        norm=norm,
        strengths=strengths,
        emotions=emotions,
        random=randoms,
        probes={probe: text for probe, (text, _) in probes.items()},
        baseline={p: dict(zip(emotions, _floats(v), strict=True)) for p, v in baseline.items()},
        delta={
            probe: {
                name: {word: _floats(changes[d, w]) for w, word in enumerate(emotions)}
                for d, name in enumerate(names)
            }
            for probe, changes in delta.items()
        },
        summary=summary,
        reference=ref,
        beats_random=Wins(len(emotions), dict(zip(strengths, map(int, wins), strict=True))),
        specific=Wins(len(emotions), dict(zip(strengths, map(int, specific_count), strict=True))),
        perplexity=perplexity,
        degrades_at=degraded[0] if degraded else None,
        degrade_factor=settings.degrade_factor,
        examples=examples,
        seconds=round(time.perf_counter() - start, 2),
    )


def _emotions(bank: EmotionBank, emotions: Sequence[str] | None) -> list[str]:
    if emotions is None:
        from emolens.concepts import showcase

        emotions = [name for name in showcase() if name in bank.emotions]
        if not emotions:
            raise EmolensError("the bank has none of the showcase emotions; pass emotions=")
    emotions = list(emotions)
    for name in emotions:
        bank.emotion_index(name)
    if len(set(emotions)) != len(emotions) or not emotions:
        raise EmolensError("emotions must be a non-empty list of distinct names")
    return emotions


def _perplexity(
    lm: LoadedModel,
    layer: int,
    norm: float,
    units: torch.Tensor,
    names: list[str],
    strengths: list[float],
    settings: SteeringSettings,
) -> tuple[Perplexity, Examples]:
    """Perplexity under the unsteered model of greedy replies generated with steering, per
    direction and strength (pooled over prompts), and the replies to the first prompt."""
    prompts, max_new_tokens = settings.generation_prompts, settings.max_new_tokens
    rows = len(names)
    nll = torch.zeros(rows, len(strengths), dtype=torch.float64)
    count = torch.zeros(rows, len(strengths), dtype=torch.float64)
    base_nll, base_count = 0.0, 0.0
    texts: dict[str, dict[str, str]] = {name: {} for name in names}
    unsteered = ""
    for p, prompt in enumerate(prompts):
        ids = lm.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        plain, alive = generate_rows(lm, ids, None, max_new_tokens)
        base_nll += float(sequence_nll(lm, ids, plain, alive)[0])
        base_count += float(alive.sum())
        if p == 0:
            unsteered = _decode(lm, plain[0], alive[0])
        for s, strength in enumerate(strengths):
            if strength == 0.0:
                generated, alive = plain.expand(rows, -1), alive.expand(rows, -1)
            else:
                vectors = {layer: strength * norm * units}
                generated, alive = generate_rows(lm, ids, vectors, max_new_tokens)
            nll[:, s] += sequence_nll(lm, ids, generated, alive)
            count[:, s] += alive.sum(1)
            if p == 0:
                for r, name in enumerate(names):
                    texts[name][str(strength)] = _decode(lm, generated[r], alive[r])
    per_direction = torch.exp(nll / count.clamp(min=1))
    n_emotions = sum(not n.startswith(RANDOM_PREFIX) for n in names)
    unsteered_ppl = math.exp(base_nll / max(base_count, 1.0))
    emotions = _floats(per_direction[:n_emotions].mean(0))
    return (
        Perplexity(
            unsteered=unsteered_ppl,
            emotions=emotions,
            random=_floats(per_direction[n_emotions:].mean(0)),
            per_direction={n: _floats(per_direction[r]) for r, n in enumerate(names)},
            ratio=_floats(torch.tensor(emotions) / unsteered_ppl),
        ),
        Examples(prompt=prompts[0], unsteered=unsteered, steered=texts),
    )


def _decode(lm: LoadedModel, tokens: torch.Tensor, alive: torch.Tensor) -> str:
    return lm.tokenizer.decode(tokens[alive.bool()].tolist(), skip_special_tokens=True)


def _floats(values: torch.Tensor) -> list[float]:
    """Plain finite floats (rounded) for JSON; a non-finite value is an error, not a NaN."""
    out = [round(float(v), 5) for v in values.reshape(-1)]
    if not all(math.isfinite(v) for v in out):
        raise EmolensError("steering evaluation produced a non-finite number")
    return out
