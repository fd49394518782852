"""Corpus -> EmotionBank: pooled story means, centring, neutral-PCA denoising, held-out check."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emolens import __version__, concepts
from emolens.atomic import atomic_path
from emolens.bank import EmotionBank, default_bank_path
from emolens.capture import capture, check_layers
from emolens.corpus import Corpus, dialogue_messages
from emolens.corpus import load as load_corpus
from emolens.errors import EmolensError
from emolens.models import LoadedModel
from emolens.stats import RunningCovariance, RunningMean, principal_components, project_out

PHASES = ("train", "neutral", "heldout")


def default_layers(depth: int) -> list[int]:
    """Every other layer from 1/4 to 3/4 depth, plus the 2/3-depth default."""
    return sorted(set(range(depth // 4, 3 * depth // 4 + 1, 2)) | {round(2 * depth / 3)})


@dataclass
class Recipe:
    """Everything that decides the vectors (recorded in the bank)."""

    layers: list[int]
    offset: int = 50  # story tokens before this position are not averaged
    neutral_offset: int = 4  # skip the attention-sink start of each neutral dialogue
    variance: float = 0.5  # neutral variance explained by the components projected out
    batch_size: int = 4


@dataclass
class _State:
    """Running sums of a build; saved atomically as a checkpoint and restored to resume."""

    emotions: list[str]
    layers: list[int]
    width: int
    done: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PHASES})
    short: int = 0

    def __post_init__(self) -> None:
        n_layers = len(self.layers)
        self.means = RunningMean(len(self.emotions), (n_layers, self.width))
        self.neutral = RunningCovariance(n_layers, self.width)
        self.norm_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.norm_count = torch.zeros((), dtype=torch.float64)
        self.heldout: dict[int, torch.Tensor] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"means.{k}": v for k, v in self.means.state_dict().items()}
        tensors |= {f"neutral.{k}": v for k, v in self.neutral.state_dict().items()}
        tensors |= {"norm_sum": self.norm_sum, "norm_count": self.norm_count}
        tensors |= {f"heldout.{i}": v for i, v in self.heldout.items()}
        return {k: v.contiguous() for k, v in tensors.items()}

    def save(self, path: Path, key: str) -> None:
        meta = {"key": key, "done": json.dumps(self.done), "short": str(self.short)}
        with atomic_path(path) as staging:
            save_file(self.tensors(), staging, metadata=meta)

    def restore(self, path: Path, key: str) -> bool:
        """Load a checkpoint written for the same build; False if there is none or it differs."""
        if not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            warnings.warn(f"{path} belongs to another build; starting afresh", stacklevel=3)
            return False
        tensors = load_file(str(path))
        self.means = RunningMean.from_state(
            {k[6:]: v for k, v in tensors.items() if k.startswith("means.")}
        )
        self.neutral = RunningCovariance.from_state(
            {k[8:]: v for k, v in tensors.items() if k.startswith("neutral.")}
        )
        self.norm_sum, self.norm_count = tensors["norm_sum"], tensors["norm_count"]
        self.heldout = {int(k[8:]): v for k, v in tensors.items() if k.startswith("heldout.")}
        self.done, self.short = json.loads(meta["done"]), int(meta["short"])
        return True


def build(
    lm: LoadedModel,
    corpus: str | os.PathLike | Corpus = "default",
    *,
    layers: list[int] | None = None,
    out: str | os.PathLike | None = None,
    offset: int = 50,
    variance: float = 0.5,
    batch_size: int = 4,
    checkpoint_every: int = 25,
    force: bool = False,
    progress: bool = True,
) -> EmotionBank:
    """Build (or reuse) the emotion bank of `lm` from a corpus; writes bank, summary, held-out set.

    `out` is a directory (default: the model's folder in the emolens cache). An interrupted
    build resumes from its last checkpoint and gives the same bank as an unbroken one.
    """
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    recipe = Recipe(layers=check_layers(lm, layers or default_layers(lm.depth)), offset=offset,
                    variance=variance, batch_size=batch_size)  # fmt: skip
    out = Path(out) if out is not None else default_bank_path(lm.fingerprint).parent
    out.mkdir(parents=True, exist_ok=True)
    key = json.dumps([asdict(recipe), corpus.digest(), lm.fingerprint["weights"]])
    bank_path = out / "bank.safetensors"
    if bank_path.is_file() and not force:
        cached = EmotionBank.load(bank_path)
        if cached.meta.get("build_key") == key:
            return cached
    emotions = corpus.emotions()
    label = {e: i for i, e in enumerate(emotions)}
    train, heldout = corpus.stories("train"), corpus.stories("heldout")
    neutral = [
        lm.format_chat(dialogue_messages(r.text), add_generation_prompt=False)
        for r in corpus.neutral()
    ]
    if not neutral:
        raise EmolensError("the corpus has no neutral dialogues: denoising needs them")
    state = _State(emotions, recipe.layers, lm.width)
    checkpoint = out / ".checkpoint.safetensors"
    resumed = state.restore(checkpoint, key)
    started = time.perf_counter()
    tokens = 0

    def run(phase: str, texts: list[str], phase_offset: int):  # noqa: ANN202
        nonlocal tokens
        batches = capture(lm, texts, recipe.layers, offset=phase_offset, batch_size=batch_size,
                          done=state.done[phase], progress=f"{phase} ({len(texts)} texts)" if progress else False)  # fmt: skip
        for count, batch in enumerate(batches, 1):
            tokens += int(batch.attention_mask.sum())
            yield batch
            state.done[phase].append(batch.number)
            if count % checkpoint_every == 0:
                state.save(checkpoint, key)

    def add_norms(batch) -> None:  # noqa: ANN001
        for i, layer in enumerate(recipe.layers):
            state.norm_sum[i] += batch.tokens(layer).double().norm(dim=-1).sum().cpu()
        state.norm_count += batch.pool_mask.sum()

    for batch in run("train", [r.text for r in train], offset):
        state.means.update(
            torch.tensor([label[train[i].emotion] for i in batch.indices]), batch.pooled()
        )
        state.short += int((batch.counts < 8).sum())
        add_norms(batch)
    for batch in run("neutral", neutral, recipe.neutral_offset):
        for i, layer in enumerate(recipe.layers):
            state.neutral.update(i, batch.tokens(layer))
        add_norms(batch)
    for batch in run("heldout", [r.text for r in heldout], offset):
        state.heldout.update(zip(batch.indices, batch.pooled(), strict=True))
    if state.short:
        warnings.warn(
            f"{state.short} training stories have fewer than {offset + 8} tokens", stacklevel=2
        )
    bank = _finish(lm, state, recipe, corpus, key)
    heldout_path = out / "heldout.safetensors"
    if heldout:
        save_file(
            {"pooled": torch.stack([state.heldout[i] for i in range(len(heldout))]).contiguous(),
             "labels": torch.tensor([emotions.index(r.emotion) for r in heldout])},
            str(heldout_path), metadata={"emotions": json.dumps(emotions), "layers": json.dumps(recipe.layers)},
        )  # fmt: skip
        bank.meta["heldout"] = heldout_accuracy(bank, heldout_path)
        bank.meta["best_layer"] = best_layer(bank.meta["heldout"])
    elapsed = time.perf_counter() - started
    bank.meta["build"] = {"seconds": round(elapsed, 1), "tokens": tokens, "resumed": resumed,
                          "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1)}  # fmt: skip
    bank.save(bank_path)
    summary = {"bank": str(bank_path), "model": lm.fingerprint, **bank.meta}
    (out / "build.json").write_text(json.dumps(summary, indent=2))
    checkpoint.unlink(missing_ok=True)
    return bank


def _finish(
    lm: LoadedModel, state: _State, recipe: Recipe, corpus: Corpus, key: str
) -> EmotionBank:
    means = state.means.mean().permute(1, 0, 2)  # [layers, emotions, width]
    center = means.mean(1)
    raw = means - center[:, None, :]
    denoised, components, explained = [], [], []
    for i, cov in enumerate(state.neutral.covariance()):
        basis, ratio = principal_components(cov, recipe.variance)
        denoised.append(project_out(raw[i], basis))
        components.append(len(basis))
        explained.append(round(float(ratio[: len(basis)].sum()), 4))
    meta = {
        "recipe": asdict(recipe),
        "build_key": key,
        "corpus": corpus.digest(),
        "counts": {"train": len(corpus.stories("train")), "heldout": len(corpus.stories("heldout")),
                   "neutral": len(corpus.neutral()), "short_stories": state.short},
        "denoising": {"components": components, "explained": explained},
        "default_layer": min(recipe.layers, key=lambda layer: abs(layer - lm.default_layer())),
        "emolens": __version__,
    }  # fmt: skip
    return EmotionBank(
        emotions=state.emotions,
        layers=recipe.layers,
        vectors={"raw": raw.float(), "denoised": torch.stack(denoised).float()},
        mean_norm=(state.norm_sum / state.norm_count).float(),
        center=center.float(),
        model=dict(lm.fingerprint),
        meta=meta,
    )


def classify(bank: EmotionBank, pooled: torch.Tensor, layer: int, variant: str) -> torch.Tensor:
    """Scores [texts, emotions]: centred pooled activations projected on unit vectors."""
    index = bank.layer_index(layer)
    return (pooled[:, index].float() - bank.center[index]) @ bank.matrix(layer, variant).T


def accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the top-k scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def heldout_accuracy(bank: EmotionBank, path: str | os.PathLike) -> dict:
    """All-emotion top-1/top-5 and showcase top-1 per layer and variant on held-out stories."""
    data = load_file(str(path))
    pooled, labels = data["pooled"], data["labels"]
    shown = [bank.emotions.index(e) for e in concepts.showcase() if e in bank.emotions]
    keep = torch.isin(labels, torch.tensor(shown))
    relabel = {old: new for new, old in enumerate(shown)}
    table = {"n": len(labels), "n_showcase": int(keep.sum()), "n_emotions": len(bank.emotions),
             "n_showcase_emotions": len(shown), "layers": {}}  # fmt: skip
    for layer in bank.layers:
        row = {}
        for variant in ("raw", "denoised"):
            scores = classify(bank, pooled, layer, variant)
            row[variant] = {
                "top1": accuracy(scores, labels, 1),
                "top5": accuracy(scores, labels, 5),
                "showcase_top1": accuracy(
                    scores[keep][:, shown], torch.tensor([relabel[int(x)] for x in labels[keep]]), 1
                ) if keep.any() else float("nan"),
            }  # fmt: skip
        table["layers"][str(layer)] = row
    return table


def best_layer(table: dict) -> int:
    """The layer with the best denoised 171-way top-1 (then top-5)."""
    rows = table["layers"]
    return int(max(rows, key=lambda k: (rows[k]["denoised"]["top1"], rows[k]["denoised"]["top5"])))


def accuracy_table(table: dict) -> str:
    """The held-out table as text."""
    k, s = table.get("n_emotions", 171), table.get("n_showcase_emotions", 12)
    lines = [f"held-out stories: {table['n']} ({k}-way), {table['n_showcase']} ({s}-way showcase)",
             f"layer   {k:>3}-way top-1      {k:>3}-way top-5      {s:>2}-way top-1",
             "        raw    denoised    raw    denoised    raw    denoised"]  # fmt: skip
    for layer, row in table["layers"].items():
        raw, den = row["raw"], row["denoised"]
        lines.append(
            f"{layer:>5}  {raw['top1']:6.1%}  {den['top1']:6.1%}    {raw['top5']:6.1%}  "
            f"{den['top5']:6.1%}    {raw['showcase_top1']:6.1%}  {den['showcase_top1']:6.1%}"
        )
    return "\n".join(lines)
