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
from pathlib import Path

import torch

from emolens.bank import EmotionBank
from emolens.errors import EmolensError
from emolens.figures import save_figure
from emolens.generation import Sampling, decode
from emolens.models import LoadedModel
from emolens.readout import resolve_layer
from emolens.steer import RANDOM_PREFIX, SteeringVector, random_direction, steer_vectors

STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
GENERATION_PROMPTS = (
    "Tell me about your morning.",
    "What do you think about when you look at the sea?",
)


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
    *,
    emotions: Sequence[str] | None = None,
    strengths: Sequence[float] = STRENGTHS,
    layer: int | None = None,
    n_random: int = 3,
    generation_prompts: Sequence[str] = GENERATION_PROMPTS,
    max_new_tokens: int = 12,
    variant: str = "denoised",
    reference: float = 0.1,
    degrade_factor: float = 2.0,
) -> dict:
    """Dose-response of steering on emotion words, against random directions, with the
    perplexity of steered text; a JSON-serialisable dict (see the module docstring).

    `emotions` defaults to the showcase emotions the bank has; they are also the candidate
    words. Strengths are fractions of the layer's mean residual norm; 0 is added if missing.
    The headline count compares, at `reference` (or the nearest strength), each emotion's
    own-word change with the largest change any random direction makes to that word.
    """
    start = time.perf_counter()
    layer = resolve_layer(lm, bank, layer)
    emotions = _emotions(bank, emotions)
    strengths = sorted({0.0, *(float(s) for s in strengths)})
    if not all(math.isfinite(s) and s >= 0 for s in strengths):
        raise EmolensError(f"strengths must be finite and >= 0 (a dose range), not {strengths}")
    if n_random < 1 or max_new_tokens < 1:
        raise EmolensError("need n_random >= 1 and max_new_tokens >= 1")
    randoms = [f"{RANDOM_PREFIX}{seed}" for seed in range(n_random)]
    names = emotions + randoms
    units = torch.stack([bank.vector(name, layer, variant) for name in emotions]
                        + [random_direction(bank.width, seed) for seed in range(n_random)])  # fmt: skip
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
        summary[name] = {
            "own": _floats(own),
            "other": _floats(others),
            "random": _floats(random.mean(0)),
            "random_max": _floats(random.max(0).values),
        }
        own_wins.append(own > random.max(0).values)
        specific.append(own > others)
    wins, specific = torch.stack(own_wins).sum(0), torch.stack(specific).sum(0)
    nonzero = strengths[1:]
    ref = min(nonzero, key=lambda s: abs(s - reference)) if nonzero else 0.0

    perplexity, examples = _perplexity(
        lm, layer, norm, units, names, strengths, generation_prompts, max_new_tokens
    )
    ratio = _floats(torch.tensor(perplexity["emotions"]) / perplexity["unsteered"])
    degraded = [s for s, r in zip(strengths, ratio, strict=True) if r > degrade_factor]
    return {
        "model": lm.name,
        "layer": layer,
        "variant": variant,
        "norm": norm,
        "strengths": strengths,
        "emotions": emotions,
        "random": randoms,
        "probes": {probe: text for probe, (text, _) in probes.items()},
        "baseline": {p: dict(zip(emotions, _floats(v), strict=True)) for p, v in baseline.items()},
        "delta": {
            probe: {
                name: {word: _floats(changes[d, w]) for w, word in enumerate(emotions)}
                for d, name in enumerate(names)
            }
            for probe, changes in delta.items()
        },
        "summary": summary,
        "beats_random": {
            "reference": ref,
            "count": int(wins[strengths.index(ref)]) if nonzero else 0,
            "of": len(emotions),
            "per_strength": dict(zip(map(str, strengths), map(int, wins), strict=True)),
        },
        "specific": {
            "per_strength": dict(zip(map(str, strengths), map(int, specific), strict=True)),
            "of": len(emotions),
        },
        "perplexity": {**perplexity, "ratio": ratio},
        "degrades_at": degraded[0] if degraded else None,
        "degrade_factor": degrade_factor,
        "examples": examples,
        "seconds": round(time.perf_counter() - start, 2),
    }


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
    prompts: Sequence[str],
    max_new_tokens: int,
) -> tuple[dict, dict]:
    """Perplexity under the unsteered model of greedy replies generated with steering, per
    direction and strength (pooled over prompts), and the replies to the first prompt."""
    if not prompts:
        raise EmolensError("need at least one generation prompt")
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
    emotions = [n for n in names if not n.startswith(RANDOM_PREFIX)]
    return (
        {
            "unsteered": math.exp(base_nll / max(base_count, 1.0)),
            "emotions": _floats(per_direction[: len(emotions)].mean(0)),
            "random": _floats(per_direction[len(emotions) :].mean(0)),
            "per_direction": {n: _floats(per_direction[r]) for r, n in enumerate(names)},
        },
        {"prompt": prompts[0], "unsteered": unsteered, "steered": texts},
    )


def _decode(lm: LoadedModel, tokens: torch.Tensor, alive: torch.Tensor) -> str:
    return lm.tokenizer.decode(tokens[alive.bool()].tolist(), skip_special_tokens=True)


def _floats(values: torch.Tensor) -> list[float]:
    """Plain finite floats (rounded) for JSON; a non-finite value is an error, not a NaN."""
    out = [round(float(v), 5) for v in values.reshape(-1)]
    if not all(math.isfinite(v) for v in out):
        raise EmolensError("steering evaluation produced a non-finite number")
    return out


def plot_steering(result: dict, path: str | Path) -> Path:
    """Three panels: word log-probability change vs strength (own, other, random; thin lines
    per emotion), the emotion x word change matrix at the reference strength, and the
    perplexity of steered text relative to unsteered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strengths, emotions = result["strengths"], result["emotions"]
    summary = result["summary"]
    figure, (doses, matrix_axes, quality) = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in emotions:
        doses.plot(strengths, summary[name]["own"], color="#d62728", alpha=0.25, lw=0.8)

    def mean(key: str) -> list[float]:
        return [
            sum(summary[n][key][i] for n in emotions) / len(emotions) for i in range(len(strengths))
        ]

    doses.plot(strengths, mean("own"), color="#d62728", lw=2.5, marker="o", label="own word")
    doses.plot(strengths, mean("other"), color="#1f77b4", lw=2, marker="o", label="other words")
    doses.plot(strengths, mean("random"), color="#7f7f7f", lw=2, marker="o", ls="--",
               label="own word, random direction")  # fmt: skip
    doses.axhline(0, color="black", lw=0.6)
    doses.set_xlabel("steering strength (fraction of mean residual norm)")
    doses.set_ylabel("change in log-probability (mean of probes)")
    count = result["beats_random"]
    doses.set_title(
        f"own word beats random: {count['count']}/{count['of']} at {count['reference']:g}"
    )
    doses.legend(fontsize=8)

    ref = strengths.index(result["beats_random"]["reference"])
    probes = list(result["delta"])
    grid = [
        [sum(result["delta"][p][e][w][ref] for p in probes) / len(probes) for w in emotions]
        for e in emotions
    ]
    limit = max(1e-9, max(abs(v) for row in grid for v in row))
    image = matrix_axes.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
    matrix_axes.set_xticks(range(len(emotions)), emotions, rotation=60, fontsize=7)
    matrix_axes.set_yticks(range(len(emotions)), emotions, fontsize=7)
    matrix_axes.set_xlabel("word")
    matrix_axes.set_ylabel("steered emotion")
    matrix_axes.set_title(f"log-probability change at strength {strengths[ref]:g}")
    figure.colorbar(image, ax=matrix_axes, fraction=0.046)

    ppl = result["perplexity"]
    base = ppl["unsteered"]
    quality.plot(strengths, [p / base for p in ppl["emotions"]], marker="o", label="emotions")
    quality.plot(strengths, [p / base for p in ppl["random"]], marker="o", ls="--",
                 color="#7f7f7f", label="random directions")  # fmt: skip
    quality.axhline(result["degrade_factor"], color="#d62728", lw=0.8, ls=":")
    quality.set_xlabel("steering strength")
    quality.set_ylabel("perplexity / unsteered")
    degrades = result["degrades_at"]
    quality.set_title(
        "text degrades at " + (f"{degrades:g}" if degrades is not None else "no tested strength")
    )
    quality.legend(fontsize=8)
    figure.suptitle(f"{result['model']}: steering at layer {result['layer']}", fontsize=11)
    figure.tight_layout()
    return save_figure(figure, path)
