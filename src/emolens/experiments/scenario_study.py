"""What the scenario studies (blackmail, sycophancy) share: sampled rollouts under steering
with the showcase readout, the default sweep, and the judge pass.

- Rollouts: the trials of one condition are decoded in one batch, each with its own seed
  (`trial.seed`), steered on the condition's positions (default: the response tokens). The
  showcase emotions in the bank are read at the bank's default layer: at the assistant's
  first position (the last prompt token) and averaged over the reply's tokens. Where the
  read layer is also steered, a steered reading includes the steering vector itself, so the
  readout correlations use the unsteered rollouts only.
- The judge runs after generation, in `annotate` (called by the runner before summarising,
  and by `--summary RESULTS`): every trial without a verdict from this judge gets one judge
  row appended to results.jsonl, the trial's identity fields plus "judge": {model, output
  (a digest of the output judged), verdicts: {rubric: {value, answer}}}. Answers are cached
  by (judge model, prompt) in judge-cache.jsonl beside the results, so neither a crash nor a
  re-run asks twice. The summary is a pure function of results.jsonl: trial and judge rows.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

from emolens import __version__, concepts
from emolens.errors import EmolensError
from emolens.experiments.judge import (
    CachedJudge,
    Judge,
    OpenAIJudge,
    ask_many,
    check_judge_options,
    make_judge,
)
from emolens.experiments.rubrics import load_rubric
from emolens.experiments.runner import Condition, Experiment, Trial, digest, load_sweep, sweep
from emolens.generation import Sampling, decode
from emolens.readout import resolve_layer, score
from emolens.steer import MODES

if TYPE_CHECKING:
    import argparse

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel

log = logging.getLogger("emolens")

STRENGTHS = "-0.1,-0.05,0,0.05,0.1"
JUDGE_CACHE = "judge-cache.jsonl"
JUDGE_CHUNK = 8  # trials judged between two appends to the results file
IDENTITY = ("experiment", "trial", "item", "item_digest", "condition", "sample", "seed", "model",
            "bank")  # fmt: skip


@dataclass
class Rollout:
    """One generated reply and its readout ([emotions] at the first position and averaged
    over the reply; `mean` is None for an empty reply)."""

    text: str
    finish: str
    prompt_tokens: int
    tokens: int
    first: list[float]
    mean: list[float] | None


def read_emotions(bank: EmotionBank) -> list[str]:
    """The emotions a rollout's readout keeps: the showcase ones in the bank (all of the
    bank's when it has none of them)."""
    return [e for e in concepts.showcase() if e in bank.emotions] or list(bank.emotions)


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


def trial_rows(rows: Sequence[dict]) -> list[dict]:
    """The trial rows of a results file (judge rows left out)."""
    return [row for row in rows if "judge" not in row]


def judge_verdicts(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{judge model: {trial id: {rubric: {value, answer}}}} from the judge rows that judged
    the output their trial row holds now (a trial run again after a corrupt line is not
    paired with a verdict on its earlier output)."""
    outputs = {row["trial"]: digest(row["output"]) for row in trial_rows(rows)}
    found: dict[str, dict[str, dict]] = {}
    for row in rows:
        judged = row.get("judge")
        if judged is not None and outputs.get(row["trial"]) == judged.get("output"):
            found.setdefault(judged["model"], {})[row["trial"]] = judged["verdicts"]
    return found


class ScenarioStudy(Experiment):
    """A study of sampled replies to scenario chats, graded by rules and optionally a judge
    (see the module docstring). Subclasses give the items, `run` and `judge_prompts`."""

    default_positions = "response"
    default_emotions: ClassVar[tuple[str, ...]] = ()
    default_max_new_tokens: ClassVar[int] = 512

    def __init__(
        self,
        items: list[dict],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        judge: Judge | str | None = None,
        judge_url: str | None = None,
        judge_model: str | None = None,
        judge_max_tokens: int = 512,
    ) -> None:
        """Sampling: `max_new_tokens` (None: the study's default), `temperature`, `top_p`.
        Judge: a `Judge`, a model spec for `local_judge` ("embedded", a directory, a .gguf
        file, a hub id), or `judge_url` with `judge_model` for an OpenAI-compatible endpoint;
        `judge_max_tokens` caps its answers."""
        super().__init__(items)
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        self.sampling = Sampling(max_new_tokens, temperature, top_p)
        check_judge_options(judge if isinstance(judge, str) else None, judge_url, judge_model)
        if judge is not None and not isinstance(judge, str) and judge_url is not None:
            raise EmolensError("give a judge or a judge endpoint, not both")
        if type(judge_max_tokens) is not int or judge_max_tokens < 1:
            raise EmolensError(f"--judge-max-tokens must be at least 1, not {judge_max_tokens!r}")
        # opened now, so that a judge that cannot load fails before any generation
        self.judge: Judge | None = (
            make_judge(judge, url=judge_url, model=judge_model, max_tokens=judge_max_tokens)
            if judge is None or isinstance(judge, str)
            else judge
        )

    # --- running ------------------------------------------------------------------------

    def rollouts(
        self,
        lm: LoadedModel,
        bank: EmotionBank,
        condition: Condition,
        chats: Sequence[list[dict]],
        seeds: Sequence[int],
    ) -> list[Rollout]:
        """One sampled reply per chat under `condition`, each seeded, with its readout."""
        if not chats:
            return []
        layer = resolve_layer(lm, bank, None)
        index = [bank.emotion_index(name) for name in read_emotions(bank)]
        prompts = [lm.encode_chat(chat, add_generation_prompt=True) for chat in chats]
        generations = decode(
            lm,
            prompts,
            [replace(self.sampling, seed=seed) for seed in seeds],
            steering=condition.steering(bank, allow_strong=True),
            mode=condition.positions,
            read_layers=[layer],
            keep=True,
        )
        found = []
        for generation in generations:
            first = score(generation.prompt_residuals[layer], bank, layer)[index]
            reply = generation.residuals.get(layer)
            mean = None
            if reply is not None and len(reply):
                mean = _rounded(score(reply, bank, layer).mean(0)[index])
            found.append(Rollout(generation.text, generation.finish, len(generation.prompt),
                                 len(generation.tokens), _rounded(first), mean))  # fmt: skip
        return found

    @staticmethod
    def readout(bank: EmotionBank, rollouts: Sequence[Rollout]) -> dict:
        """The readout field of a trial: its layer, the emotions, and per turn the reading at
        the first position and the mean over the reply."""
        return {"layer": bank.default_layer, "emotions": read_emotions(bank),
                "turns": [{"first": r.first, "mean": r.mean} for r in rollouts]}  # fmt: skip

    # --- the judge ----------------------------------------------------------------------

    def open_judge(self, folder: Path) -> CachedJudge | None:
        """The judge with its answer cache in `folder`; None without a judge."""
        return CachedJudge(self.judge, folder / JUDGE_CACHE) if self.judge is not None else None

    @abstractmethod
    def judge_prompts(self, row: dict) -> dict[str, str]:
        """The judge's prompts for one trial row: rubric name -> prompt."""

    def annotate(self, rows: list[dict], results: Path) -> Iterator[list[dict]]:
        judge = self.open_judge(results.parent)
        if judge is None:
            return
        done = set(judge_verdicts(rows).get(judge.name, {}))
        todo = [r for r in trial_rows(rows) if r["trial"] not in done]
        if not todo:
            return
        workers = 4 if isinstance(self.judge, OpenAIJudge) else 1
        with tqdm(total=len(todo), unit="trial", desc=f"{self.name} judge") as bar:
            for start in range(0, len(todo), JUDGE_CHUNK):
                chunk = todo[start : start + JUDGE_CHUNK]
                began = time.perf_counter()
                asked = [(row["trial"], rubric, prompt) for row in chunk
                         for rubric, prompt in self.judge_prompts(row).items()]  # fmt: skip
                answers = ask_many(judge, [prompt for _, _, prompt in asked], workers=workers)
                seconds = round((time.perf_counter() - began) / len(chunk), 4)
                verdicts: dict[str, dict] = {}
                for (trial, rubric, _), answer in zip(asked, answers, strict=True):
                    value = load_rubric(rubric).parse(answer)
                    verdicts.setdefault(trial, {})[rubric] = {"value": value, "answer": answer}
                yield [{**{key: row[key] for key in IDENTITY if key in row}, "emolens": __version__,
                        "judge": {"model": judge.name, "output": digest(row["output"]),
                                  "verdicts": verdicts[row["trial"]]},
                        "seconds": seconds} for row in chunk]  # fmt: skip
                bar.update(len(chunk))
        log.info("%s judge %s: %d asked, %d from the cache", self.name, judge.name,
                 judge.misses, judge.hits)  # fmt: skip

    # --- options and conditions ---------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--emotions", default="default", metavar="LIST",
                            help=f"steered emotions: 'default' ({','.join(cls.default_emotions)}), "
                            "'none' or a comma list")  # fmt: skip
        parser.add_argument("--strengths", default=STRENGTHS, metavar="LIST",
                            help=f"strengths of each steered emotion ({STRENGTHS}; write "
                            "--strengths=-0.1,0.1 when the list starts with a minus)")  # fmt: skip
        sampling = parser.add_argument_group("sampling")
        sampling.add_argument("--max-new-tokens", type=int, default=cls.default_max_new_tokens,
                              metavar="N", help=f"reply length cap ({cls.default_max_new_tokens})")  # fmt: skip
        sampling.add_argument("--temperature", type=float, default=1.0,
                              help="sampling temperature (1.0; 0: greedy)")  # fmt: skip
        sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0)")
        judge = parser.add_argument_group(
            "judge (after generation; answers cached in the out folder)"
        )
        judge.add_argument("--judge", default=None, metavar="SPEC",
                           help="a judge model emolens loads: a local directory, a .gguf file, "
                           "a hub id, or 'embedded' (greedy, on this machine)")  # fmt: skip
        judge.add_argument("--judge-url", default=None, metavar="URL",
                           help="an OpenAI-compatible endpoint (ending in /v1) as the judge")  # fmt: skip
        judge.add_argument("--judge-model", default=None, metavar="NAME",
                           help="the model name at --judge-url")  # fmt: skip
        judge.add_argument("--judge-max-tokens", type=int, default=512, metavar="N",
                           help="judge answer length cap (512)")  # fmt: skip

    @staticmethod
    def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
        """The constructor options every scenario study takes from its command line."""
        return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "judge": args.judge, "judge_url": args.judge_url,
                "judge_model": args.judge_model, "judge_max_tokens": args.judge_max_tokens,
                "limit": args.limit}  # fmt: skip

    def conditions(
        self, args: argparse.Namespace, bank: EmotionBank, lm: LoadedModel
    ) -> list[Condition]:
        """Unsteered, each --emotions at each --strengths, then --steer and --sweep."""
        mode = args.positions or self.default_positions
        if mode not in MODES:
            raise EmolensError(f"steering mode {mode!r} must be one of {', '.join(MODES)}")
        names = self.steered_emotions(args.emotions, bank)
        found = [Condition.make({}, None, mode)]
        found += sweep([f"{name}={args.strengths}" for name in names], args.layers, mode,
                       args.allow_strong)  # fmt: skip
        found += sweep(args.steer, args.layers, mode, args.allow_strong)
        if args.sweep:
            found += load_sweep(args.sweep, args.allow_strong)
        return list(dict.fromkeys(found))

    def steered_emotions(self, spec: str, bank: EmotionBank) -> list[str]:
        """'default': the study's emotions that the bank has; 'none'; or a comma list."""
        if spec == "none":
            return []
        if spec == "default":
            missing = [e for e in self.default_emotions if e not in bank.emotions]
            if missing:
                log.warning("%s: the bank lacks %s; not steered", self.name, ", ".join(missing))
            return [e for e in self.default_emotions if e in bank.emotions]
        names = [name.strip() for name in spec.split(",") if name.strip()]
        if not names:
            raise EmolensError("--emotions is empty: give 'default', 'none' or a comma list")
        for name in names:
            bank.emotion_index(name)
        return names

    def seeds(self, trials: Sequence[Trial], turn: int = 0) -> list[int]:
        """The sampling seed of each trial's `turn`-th reply (turn 0: the trial's seed)."""
        return [(t.seed + turn * 0x9E3779B9) % 2**63 for t in trials]
