"""Corpus -> EmotionBank: pooled story means, centring, neutral-PCA denoising, held-out check.

`build(lm, corpus, recipe)` runs the corpus through the model once per text (stopping after
the deepest layer of the recipe), keeps float64 running sums only (and, for probes, each
training text's pooled activation), checkpoints them, and finishes the bank: emotion means,
centred, with the principal components of the neutral dialogues projected out; optionally
(`Recipe.probes`) one-vs-rest logistic-regression probes on the centred pooled activations,
and optionally (`Recipe.genres`) with the training split of the other genres pooled in
beside the stories. Beside the bank: the held-out stories' pooled activations and the
emotion means of two halves of the training stories (the report's split-half check). A
bank is cached by (model, corpus, recipe): the default build (shipped corpus, default
recipe) in the model's folder, any other in a folder of its own key, and no build ever
replaces a bank built from another corpus or recipe.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emolens import __version__
from emolens.atomic import atomic_path
from emolens.bank import EmotionBank, default_bank_path, keyed_bank_path
from emolens.capture import capture, check_layers
from emolens.corpus import Corpus, dialogue_messages
from emolens.corpus import load as load_corpus
from emolens.errors import EmolensError
from emolens.evaluate.heldout import heldout_accuracy
from emolens.models import LoadedModel
from emolens.stats import (
    RunningCovariance,
    RunningMean,
    logistic_directions,
    principal_components,
    project_out,
)

log = logging.getLogger("emolens")
PHASES = ("train", "genres", "neutral", "heldout")
MIN_POOLED = 8  # stories pooling fewer tokens than this are counted and reported
PROBE_L2 = 1e-3  # ridge penalty of the logistic probes (on activations scaled to unit spread)


def default_layers(depth: int) -> list[int]:
    """Every other layer from 1/4 to 3/4 depth, plus the 2/3-depth default."""
    return sorted(set(range(depth // 4, 3 * depth // 4 + 1, 2)) | {round(2 * depth / 3)})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the vectors (recorded in the bank). `layers` None means
    `default_layers` of the model."""

    layers: tuple[int, ...] | None = None
    offset: int = 50  # story tokens before this position are not averaged
    neutral_offset: int = 4  # skip the attention-sink start of each neutral dialogue
    variance: float = 0.5  # neutral variance explained by the components projected out
    batch_size: int = 4
    genres: bool = False  # also pool the other genres' train split, from `neutral_offset`
    probes: bool = False  # also fit logistic-regression probes (the "probe" variant)

    def __post_init__(self) -> None:
        for name in ("genres", "probes"):
            if not isinstance(getattr(self, name), bool):
                raise EmolensError(f"recipe {name} must be true or false")
        for name, least in (("offset", 0), ("neutral_offset", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise EmolensError(
                    f"recipe {name} must be a whole number >= {least}, not {value!r}"
                )
        if (
            isinstance(self.variance, bool)
            or not isinstance(self.variance, (int, float))
            or not 0.0 <= self.variance <= 1.0
        ):
            raise EmolensError(f"recipe variance must be in [0, 1], not {self.variance!r}")
        if self.layers is not None:
            if not self.layers:
                raise EmolensError("recipe layers must not be empty")
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    def for_model(self, lm: LoadedModel) -> Recipe:
        """This recipe with its layers chosen and checked for `lm`."""
        layers = check_layers(lm, list(self.layers or default_layers(lm.depth)))
        return replace(self, layers=tuple(layers))


@dataclass
class _State:
    """Running sums of a build; saved atomically as a checkpoint and restored to resume."""

    emotions: list[str]
    layers: list[int]
    width: int
    done: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PHASES})
    short: int = 0
    tokens: int = 0  # tokens read by this process (not checkpointed)

    def __post_init__(self) -> None:
        n_layers = len(self.layers)
        self.means = RunningMean(len(self.emotions), (n_layers, self.width))
        self.neutral = RunningCovariance(n_layers, self.width)
        self.norm_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.norm_count = torch.zeros((), dtype=torch.float64)
        self.pooled_tokens = torch.zeros(len(self.emotions), dtype=torch.float64)
        self.heldout: dict[int, torch.Tensor] = {}
        # stories' means in two halves (alternate texts): label 2 * emotion + index parity
        self.halves = RunningMean(2 * len(self.emotions), (n_layers, self.width))
        self.train: dict[int, torch.Tensor] = {}  # text -> pooled [layers, width] (for probes)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"means.{k}": v for k, v in self.means.state_dict().items()}
        tensors |= {f"neutral.{k}": v for k, v in self.neutral.state_dict().items()}
        tensors |= {f"halves.{k}": v for k, v in self.halves.state_dict().items()}
        tensors |= {"norm_sum": self.norm_sum, "norm_count": self.norm_count,
                    "pooled_tokens": self.pooled_tokens}  # fmt: skip
        tensors |= {f"heldout.{i}": v for i, v in self.heldout.items()}
        tensors |= {f"train.{i}": v for i, v in self.train.items()}
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
            log.warning("%s belongs to another build; starting afresh", path)
            return False
        tensors = load_file(str(path))
        self.means = RunningMean.from_state(
            {k[6:]: v for k, v in tensors.items() if k.startswith("means.")}
        )
        self.neutral = RunningCovariance.from_state(
            {k[8:]: v for k, v in tensors.items() if k.startswith("neutral.")}
        )
        self.norm_sum, self.norm_count = tensors["norm_sum"], tensors["norm_count"]
        self.pooled_tokens = tensors["pooled_tokens"]
        self.heldout = {int(k[8:]): v for k, v in tensors.items() if k.startswith("heldout.")}
        self.halves = RunningMean.from_state(
            {k[7:]: v for k, v in tensors.items() if k.startswith("halves.")}
        )
        self.train = {int(k[6:]): v for k, v in tensors.items() if k.startswith("train.")}
        self.done, self.short = json.loads(meta["done"]), int(meta["short"])
        return True

    def merge(self, other: _State) -> _State:
        """Add the statistics of another shard of the same build (exact in float64)."""
        self.means.merge(other.means)
        self.neutral.merge(other.neutral)
        self.halves.merge(other.halves)
        self.norm_sum += other.norm_sum
        self.norm_count += other.norm_count
        self.pooled_tokens += other.pooled_tokens
        self.heldout.update(other.heldout)
        self.train.update(other.train)
        for phase in PHASES:
            self.done[phase] += other.done[phase]
        self.short += other.short
        self.tokens += other.tokens
        return self


@dataclass(frozen=True)
class Job:
    """What every shard of a build needs: the texts of each phase (strings or token ids), the
    emotion label of each training text (stories, then other genres), and the recipe's layers,
    offsets and batch size; `keep_pooled` keeps each training text's pooled activation (for
    the logistic probes)."""

    emotions: list[str]
    layers: list[int]
    width: int
    texts: dict[str, list]
    labels: list[int]
    offsets: dict[str, int]
    batch_size: int
    weights: str  # the model's weights digest: a worker with another model is refused
    keep_pooled: bool = False

    def batches(self, phase: str) -> int:
        """How many batches the phase's plan has (`capture.plan_batches`)."""
        return -(-len(self.texts[phase]) // self.batch_size)

    def state(self) -> _State:
        """Empty statistics for this build."""
        return _State(list(self.emotions), list(self.layers), self.width)


Shard = tuple[str, list[int]]  # a phase and batch numbers of its plan
# Runs shards elsewhere (`emolens.distributed.RayWorkers.build`); yields their statistics in order.
Executor = Callable[[Job, list[Shard]], Iterator[_State]]


def shard_statistics(
    lm: LoadedModel,
    job: Job,
    phase: str,
    numbers: Sequence[int],
    state: _State | None = None,
    after_batch: Callable[[_State], None] | None = None,
    progress: bool = False,
) -> _State:
    """Add the statistics of batches `numbers` of a phase's plan to `state` (new if None).

    `after_batch(state)` runs after each batch has been added and recorded as done."""
    state = state if state is not None else job.state()
    texts, wanted = job.texts[phase], set(numbers)
    skip = [n for n in range(job.batches(phase)) if n not in wanted]
    batches = capture(lm, texts, state.layers, offset=job.offsets[phase], batch_size=job.batch_size,
                      done=skip, progress=f"{phase} ({len(texts)} texts)" if progress else False)  # fmt: skip
    start = len(job.texts["train"]) if phase == "genres" else 0  # texts' index in job.labels
    for batch in batches:
        state.tokens += int(batch.attention_mask.sum())
        if phase in ("train", "genres"):
            labels = torch.tensor([job.labels[start + i] for i in batch.indices])
            counts = batch.counts
            pooled = counts > 0
            values = batch.pooled()
            state.means.update(labels[pooled], values[pooled])
            state.pooled_tokens.index_add_(0, labels, counts.double())
            state.short += int((counts < MIN_POOLED).sum())
            if phase == "train":
                parity = torch.tensor([i % 2 for i in batch.indices])
                state.halves.update((2 * labels + parity)[pooled], values[pooled])
            if job.keep_pooled:
                state.train.update((start + i, v) for i, v, kept in
                                   zip(batch.indices, values, pooled.tolist(), strict=True) if kept)  # fmt: skip
        elif phase == "neutral":
            for i, layer in enumerate(state.layers):
                state.neutral.update(i, batch.tokens(layer))
        else:
            state.heldout.update(zip(batch.indices, batch.pooled(), strict=True))
        if phase != "heldout":
            for i, layer in enumerate(state.layers):
                state.norm_sum[i] += batch.tokens(layer).double().norm(dim=-1).sum().cpu()
            state.norm_count += batch.pool_mask.sum()
        state.done[phase].append(batch.number)
        if after_batch is not None:
            after_batch(state)
    return state


def build(
    lm: LoadedModel,
    corpus: str | os.PathLike | Corpus = "default",
    recipe: Recipe = Recipe(),
    *,
    out: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    force: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> EmotionBank:
    """Build (or reuse) the emotion bank of `lm` from a corpus; writes bank, summary, held-out set.

    `out` is a directory (default: the cache folder of this model, corpus and recipe). An
    interrupted build resumes from its last checkpoint and gives the same bank as an unbroken
    one. A bank already in `out` is reused when it was built the same way, and never replaced
    when it was built from another corpus or recipe unless `force` is set. An `executor`
    (`emolens.distributed.RayWorkers.build`) computes shards of `checkpoint_every` batches
    elsewhere, merged and checkpointed here in plan order: the bank is the same.
    """
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise EmolensError(
            f"checkpoint_every must be a whole number >= 1, not {checkpoint_every!r}"
        )
    shipped = not isinstance(corpus, Corpus) and str(corpus) == "default"
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    recipe = recipe.for_model(lm)
    bank_path, key = locate(lm, corpus, recipe, out, shipped)
    out = bank_path.parent
    if out.exists() and not out.is_dir():
        raise EmolensError(f"{out}: exists and is not a directory")
    if bank_path.is_file():
        cached = EmotionBank.load(bank_path)
        if cached.meta.get("build_key") == key and not force:
            return cached
        if cached.meta.get("build_key") != key and not force:
            raise EmolensError(
                f"{bank_path} holds a bank built from another corpus or recipe; give another "
                "--out (or force=True / --force to replace it)"
            )
    emotions = corpus.emotions()
    label = {e: i for i, e in enumerate(emotions)}
    train, heldout = corpus.stories("train"), corpus.stories("heldout")
    genres = corpus.genres("train") if recipe.genres else []
    if recipe.genres and not genres:
        raise EmolensError("recipe genres: the corpus has no training texts of other genres")
    neutral = [lm.encode_chat(dialogue_messages(r.text), add_generation_prompt=False)
               for r in corpus.neutral()]  # fmt: skip
    if not neutral:
        raise EmolensError("the corpus has no neutral dialogues: denoising needs them")
    state = _State(emotions, list(recipe.layers or ()), lm.width)
    checkpoint = out / ".checkpoint.safetensors"
    resumed = state.restore(checkpoint, key)
    started = time.perf_counter()
    job = Job(emotions, state.layers, lm.width,
              {"train": [r.text for r in train], "genres": [r.text for r in genres],
               "neutral": neutral, "heldout": [r.text for r in heldout]},
              [label[r.emotion] for r in train + genres],
              {"train": recipe.offset, "genres": recipe.neutral_offset,
               "neutral": recipe.neutral_offset, "heldout": recipe.offset},
              recipe.batch_size, str(lm.fingerprint.get("weights")), recipe.probes)  # fmt: skip
    finished = {p: set(state.done[p]) for p in PHASES}
    pending = {p: [n for n in range(job.batches(p)) if n not in finished[p]] for p in PHASES}
    if executor is None:
        count = itertools.count(1)

        def save_every(state: _State) -> None:
            if next(count) % checkpoint_every == 0:
                state.save(checkpoint, key)

        for phase in PHASES:
            if pending[phase]:
                shard_statistics(lm, job, phase, pending[phase], state, save_every, progress)
    else:  # shards of `checkpoint_every` batches, merged in plan order
        shards = [(p, pending[p][i : i + checkpoint_every]) for p in PHASES
                  for i in range(0, len(pending[p]), checkpoint_every)]  # fmt: skip
        for partial in executor(job, shards):
            state.merge(partial).save(checkpoint, key)
    tokens = state.tokens
    if state.short:
        log.warning("%d training texts pool fewer than %d tokens (offset %d)", state.short,
                    MIN_POOLED, recipe.offset)  # fmt: skip
    texts = train + genres
    kept = sorted(state.train)
    labels = [label[texts[i].emotion] for i in kept]
    bank = _finish(lm, state, recipe, corpus, key, labels)
    halves = state.halves.mean().view(len(emotions), 2, len(bank.layers), lm.width)
    with atomic_path(out / "halves.safetensors") as staging:
        save_file({"means": halves.permute(1, 2, 0, 3).float().contiguous(),
                   "counts": state.halves.counts.view(len(emotions), 2).T.contiguous()},
                  str(staging), metadata={"emotions": json.dumps(emotions),
                                          "layers": json.dumps(bank.layers)})  # fmt: skip
    if heldout:
        heldout_path = out / "heldout.safetensors"
        tensors = {"pooled": torch.stack([state.heldout[i] for i in range(len(heldout))]).contiguous(),
                   "labels": torch.tensor([emotions.index(r.emotion) for r in heldout])}  # fmt: skip
        with atomic_path(heldout_path) as staging:
            save_file(tensors, str(staging), metadata={"emotions": json.dumps(emotions),
                                                       "layers": json.dumps(bank.layers)})  # fmt: skip
        table = heldout_accuracy(bank, heldout_path)
        bank.meta["heldout"] = table.to_json()
        bank.meta["best_layer"] = table.best_layer
    elapsed = time.perf_counter() - started
    bank.meta["build"] = {"seconds": round(elapsed, 1), "tokens": tokens, "resumed": resumed,
                          "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
                          "path": str(bank_path)}  # fmt: skip
    bank.save(bank_path)
    summary = {"bank": str(bank_path), "model": lm.fingerprint, "default_layer": bank.default_layer,
               **bank.meta}  # fmt: skip
    with atomic_path(out / "build.json") as staging:
        staging.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    checkpoint.unlink(missing_ok=True)
    return bank


def locate(
    lm: LoadedModel,
    corpus: Corpus,
    recipe: Recipe,
    out: str | os.PathLike | None = None,
    shipped: bool = False,
) -> tuple[Path, str]:
    """Where the bank of this build goes, and its build key: `out`, else the model's default
    bank for the `shipped` corpus with the default recipe, else a folder of the key's own."""
    recipe = recipe.for_model(lm)
    key = json.dumps([asdict(recipe), corpus.digest(), lm.fingerprint["weights"]])
    if out is not None:
        return Path(out) / "bank.safetensors", key
    if shipped and recipe == Recipe().for_model(lm):
        return default_bank_path(lm.fingerprint), key
    return keyed_bank_path(lm.fingerprint, key), key


def probes(state: _State, labels: list[int], center: torch.Tensor) -> torch.Tensor:
    """Logistic-regression directions [layers, emotions, width] of the centred pooled texts."""
    pooled = torch.stack([state.train[i] for i in sorted(state.train)]).double()
    found = []
    for i, layer in enumerate(state.layers):
        log.info("fitting %d logistic probes at layer %d", len(state.emotions), layer)
        features = pooled[:, i] - center[i].double()
        found.append(logistic_directions(features, torch.tensor(labels), len(state.emotions),
                                         l2=PROBE_L2))  # fmt: skip
    return torch.stack(found).float()


def _finish(
    lm: LoadedModel,
    state: _State,
    recipe: Recipe,
    corpus: Corpus,
    key: str,
    labels: list[int] | None = None,
) -> EmotionBank:
    empty = [e for e, n in zip(state.emotions, state.pooled_tokens.tolist(), strict=True) if n == 0]
    if empty:
        raise EmolensError(
            f"no story token was pooled for {len(empty)} emotion(s) ({', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''}): every story is shorter than the offset "
            f"{recipe.offset}; lower the offset"
        )
    if float(state.norm_count) == 0:
        raise EmolensError("no token was pooled at all: lower the offsets")
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
                   "genres": len(corpus.genres("train")) if recipe.genres else 0,
                   "neutral": len(corpus.neutral()), "short_stories": state.short},
        "denoising": {"components": components, "explained": explained},
        "emolens": __version__,
    }  # fmt: skip
    layers = list(recipe.layers or ())
    vectors = {"raw": raw.float(), "denoised": torch.stack(denoised).float()}
    if recipe.probes:
        vectors["probe"] = probes(state, labels or [], center)
    return EmotionBank(
        emotions=state.emotions,
        layers=layers,
        vectors=vectors,
        mean_norm=(state.norm_sum / state.norm_count).float(),
        center=center.float(),
        model=dict(lm.fingerprint),
        meta=meta,
        default_layer=min(layers, key=lambda layer: abs(layer - lm.default_layer())),
    )
