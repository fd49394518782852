"""The experiment runner: items x conditions x samples -> one JSON line per trial -> summary.

An `Experiment` knows its items, plans its trials and runs a batch of trials that share one
condition (one decoding batch with per-row steering, or one scoring pass). The runner owns
everything else:
- conditions: "no steering" or a SteeringVector (emotions, strengths, layers, positions),
  matched-norm random controls included ("random:SEED"), from a sweep spec or a TOML/JSON file;
- the results file: append-only JSON lines, flushed and synced whole; every line carries the
  trial id, item and condition, its seed, timing, the model fingerprint, a digest of the item
  and of the bank, and the emolens version;
- resume: trials already in the file are skipped, so a re-run after a crash (even a SIGKILL)
  finishes the same trials with the same seeds; lines from another model, bank or item set
  are refused; a corrupt line is reported (file:line) and its trial is run again;
- batching by condition, a progress bar with ETA, and summarising a results file alone;
- annotations: before summarising, a study may append rows made from finished trials (a
  judge's verdicts, `Experiment.annotate`); they repeat their trial's identity fields, so the
  checks above and resume treat them as part of that trial.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm.auto import tqdm

from emolens import __version__
from emolens.atomic import write_text
from emolens.errors import EmolensError
from emolens.jsonl import AppendLog, recover
from emolens.steer import RANDOM_PREFIX, check_strength

if TYPE_CHECKING:
    import argparse

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel
    from emolens.steer import SteeringVector

log = logging.getLogger("emolens")


@dataclass(frozen=True)
class Condition:
    """Steering for a trial: {emotion: strength} (empty: unsteered) at `layers` (None: the
    bank's default layer) on `positions` ("all", "prompt", "response", or a mode an
    experiment defines, such as the activity tokens of the preference study)."""

    strengths: tuple[tuple[str, float], ...] = ()
    layers: tuple[int, ...] | None = None
    positions: str = "all"

    @property
    def name(self) -> str:
        if not self.strengths:
            return "unsteered"
        name = ",".join(f"{emotion}={strength:+g}" for emotion, strength in self.strengths)
        if self.layers is not None:
            name += f"@{'-'.join(map(str, self.layers))}"
        return name

    @property
    def emotion(self) -> str | None:
        """The single steered emotion (None when unsteered or several)."""
        return self.strengths[0][0] if len(self.strengths) == 1 else None

    @property
    def strength(self) -> float:
        """The single steered strength (0 when unsteered)."""
        return self.strengths[0][1] if len(self.strengths) == 1 else 0.0

    @property
    def is_random(self) -> bool:
        return any(name.startswith(RANDOM_PREFIX) for name, _ in self.strengths)

    def steering(self, bank: EmotionBank, allow_strong: bool = False) -> SteeringVector | None:
        if not self.strengths:
            return None
        layers = list(self.layers) if self.layers is not None else None
        return bank.steering(dict(self.strengths), layers, allow_strong=allow_strong)

    def to_json(self) -> dict:
        return {"name": self.name, "steer": dict(self.strengths),
                "layers": list(self.layers) if self.layers is not None else None,
                "positions": self.positions}  # fmt: skip

    @classmethod
    def make(
        cls,
        strengths: dict[str, float],
        layers: Sequence[int] | None = None,
        positions: str = "all",
        allow_strong: bool = False,
    ) -> Condition:
        """A validated condition (zero strengths are dropped)."""
        checked = {n: check_strength(n, s, allow_strong) for n, s in strengths.items()}
        return cls(
            tuple(sorted((n, s) for n, s in checked.items() if s != 0)),
            tuple(int(layer) for layer in layers) if layers is not None else None,
            positions,
        )


def sweep(
    specs: Iterable[str],
    layers: Sequence[int] | None = None,
    positions: str = "all",
    allow_strong: bool = False,
) -> list[Condition]:
    """Conditions from "emotion=s1,s2,..." items: one condition per emotion and strength;
    a strength of 0 is the shared unsteered condition. Order is kept, duplicates dropped."""
    found: list[Condition] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not name or not sep or not values.strip():
            raise EmolensError(f"'{spec}': expected EMOTION=S1,S2,... e.g. desperate=-0.1,0,0.1")
        for value in values.split(","):
            try:
                strength = float(value)
            except ValueError:
                raise EmolensError(f"'{spec}': strength '{value}' is not a number") from None
            found.append(Condition.make({name: strength}, layers, positions, allow_strong))
    return list(dict.fromkeys(found))


def load_sweep(path: str | os.PathLike, allow_strong: bool = False) -> list[Condition]:
    """Conditions from a TOML or JSON file: a list `conditions` of tables with `steer`
    ({emotion: strength}), optional `layers` and `positions`, and/or a list `sweep` of
    "emotion=s1,s2" items."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise EmolensError(f"{path}: not a readable sweep file ({error})") from None
    if not isinstance(data, dict):
        raise EmolensError(f"{path}: a sweep file holds `conditions` and/or `sweep`")
    conditions = sweep(data.get("sweep", []), allow_strong=allow_strong)
    for i, entry in enumerate(data.get("conditions", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("steer", {}), dict):
            raise EmolensError(f"{path}: conditions[{i}]: expected a table with `steer`")
        try:
            conditions.append(
                Condition.make(
                    entry.get("steer", {}),
                    entry.get("layers"),
                    entry.get("positions", "all"),
                    allow_strong,
                )  # fmt: skip
            )
        except (EmolensError, TypeError, ValueError) as error:
            raise EmolensError(f"{path}: conditions[{i}]: {error}") from None
    if not conditions:
        raise EmolensError(f"{path}: no conditions")
    return list(dict.fromkeys(conditions))


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Trial:
    """One run of one item under one condition; `seed` is derived from the run's seed and
    the trial id, so it never depends on what else runs."""

    id: str
    item: dict
    condition: Condition
    sample: int
    seed: int


def make_trial(item: dict, condition: Condition, sample: int, seed: int) -> Trial:
    ident = f"{item['id']}|{condition.name}|{condition.positions}|{sample}"
    derived = int(hashlib.sha256(f"{seed}|{ident}".encode()).hexdigest()[:8], 16)
    return Trial(ident, item, condition, sample, derived)


class Experiment(ABC):
    """A behavioural study: items, a plan of trials, how to run a batch of trials that share
    a condition, and how to summarise and show the results."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_positions: ClassVar[str] = "all"
    # A module with summarize(rows) and optionally figures(summary, out), page(summary,
    # figures) and headline(summary): the study's summary, imported when first needed.
    summary_module: ClassVar[str | None] = None

    def __init__(self, items: list[dict]) -> None:
        if not items:
            raise EmolensError(f"{self.name}: no items to run")
        ids = [item.get("id") for item in items]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            raise EmolensError(f"{self.name}: every item needs a unique string id")
        self.items = items

    def plan(self, conditions: Sequence[Condition], samples: int, seed: int) -> list[Trial]:
        """Every item under every condition, `samples` times (override for other designs)."""
        return [make_trial(item, condition, sample, seed)
                for condition in conditions for item in self.items
                for sample in range(samples)]  # fmt: skip

    @abstractmethod
    def run(self, lm: LoadedModel, bank: EmotionBank, trials: list[Trial]) -> list[dict]:
        """One record per trial (all share a condition): the prompt(s), the output, the
        grade(s) and the readout that matters for the study."""

    def summarize(self, rows: list[dict]) -> dict:
        """A JSON-able summary of the result rows (pure: the rows alone decide it)."""
        summarize = self._summary("summarize")
        if summarize is None:
            raise NotImplementedError(f"{self.name}: no summary_module with summarize(rows)")
        return summarize(rows)

    def _summary(self, function: str) -> Callable | None:
        """`function` of the study's summary module, if it has one."""
        if self.summary_module is None:
            return None
        return getattr(importlib.import_module(self.summary_module), function, None)

    def annotate(self, rows: list[dict], results: Path) -> Iterator[list[dict]]:
        """Rows made from the finished ones (a judge's verdicts), yielded in chunks that are
        appended to `results` as they come and summarised with the rest (none by default)."""
        return iter(())

    def figures(self, summary: dict, out: Path) -> dict[str, Path]:
        """PNG figures of a summary, written into `out`."""
        figures = self._summary("figures")
        return figures(summary, out) if figures else {}

    def page(self, summary: dict, figures: dict[str, Path]) -> str:
        """The summary as one self-contained HTML page."""
        from emolens.experiments.page import default_page

        page = self._summary("page")
        return page(summary, figures) if page else default_page(self.name, summary, figures)

    def headline(self, summary: dict) -> str:
        """A few terminal lines about a summary."""
        headline = self._summary("headline")
        if headline:
            return headline(summary)
        return f"{self.name}: {summary.get('trials', '?')} trials summarised"

    @classmethod
    def create(cls, **options: Any) -> Experiment:
        """The study from plain options (the Python API); `limit` keeps the first items."""
        raise NotImplementedError

    @classmethod  # noqa: B027 - studies without options keep this empty default
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options of this study for `emolens experiment NAME` (none by default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Experiment:
        """The study from its command-line options."""
        return cls.create(limit=args.limit)

    def conditions(
        self, args: argparse.Namespace, bank: EmotionBank, lm: LoadedModel
    ) -> list[Condition]:
        """The conditions of a command-line run: unsteered, then --steer sweeps and --sweep."""
        mode = args.positions or self.default_positions
        found = [Condition.make({}, None, mode)]
        found += sweep(args.steer, args.layers, mode, args.allow_strong)
        if args.sweep:
            found += load_sweep(args.sweep, args.allow_strong)
        return list(dict.fromkeys(found))


@dataclass
class Results:
    """The rows of a results file, and the lines that could not be used."""

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_results(path: str | os.PathLike, experiment: str | None = None) -> Results:
    """The trial rows of a results file; corrupt lines are reported (file:line), not fatal."""
    results = Results()
    for number, row in recover(path, tolerant=True, problems=results.problems):
        if not isinstance(row, dict) or not isinstance(row.get("trial"), str):
            results.problems.append(f"{path}:{number}: not a trial record")
        elif experiment is not None and row.get("experiment") != experiment:
            raise EmolensError(
                f"{path}:{number}: a result of experiment {row.get('experiment')!r}, "
                f"not {experiment!r}"
            )
        else:
            results.rows.append(row)
    for problem in results.problems:
        log.warning("%s (the trial is run again; the line is left as it is)", problem)
    return results


def _check_rows(path: Path, rows: list[dict], items: dict[str, str], model: str, bank: str) -> None:
    for row in rows:
        if row.get("model", {}).get("weights") != model:
            raise EmolensError(
                f"{path}: trial {row['trial']} was run on another model "
                f"({row.get('model', {}).get('name')}); give another --out"
            )
        if row.get("bank") != bank:
            raise EmolensError(f"{path}: trial {row['trial']} was run with another bank; "
                               "give another --out")  # fmt: skip
        item = row.get("item", {}).get("id")
        if item in items and row.get("item_digest") != items[item]:
            raise EmolensError(
                f"{path}: item {item!r} has changed since trial {row['trial']} was run "
                "(another item set); give another --out"
            )


# Runs chunks of trials (each of one condition) and yields, in order, each chunk's records
# and the seconds per trial.
TrialExecutor = Callable[
    [Experiment, "LoadedModel", "EmotionBank", list[list[Trial]]],
    Iterator[tuple[list[dict], float]],
]


def run_here(
    experiment: Experiment, lm: LoadedModel, bank: EmotionBank, chunks: list[list[Trial]]
) -> Iterator[tuple[list[dict], float]]:
    """The default `TrialExecutor`: every chunk in this process, one after another."""
    for chunk in chunks:
        began = time.perf_counter()
        records = experiment.run(lm, bank, chunk)
        yield records, (time.perf_counter() - began) / len(chunk)


def run_experiment(
    experiment: Experiment,
    lm: LoadedModel,
    bank: EmotionBank,
    out: str | os.PathLike,
    conditions: Sequence[Condition],
    *,
    samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    executor: TrialExecutor | None = None,
) -> dict:
    """Run every trial of the plan not yet in `out`/results.jsonl, then summarise all of them
    into `out` (summary.json, figures, page.html). Returns the summary.

    Trials run in chunks of `batch_size` that share a condition, by `executor` (default: in
    this process; `emolens.distributed.RayWorkers.trials` runs them on Ray workers); this
    process alone writes the results file, in plan order."""
    if samples < 1 or batch_size < 1:
        raise EmolensError("samples and batch size must be at least 1")
    if not conditions:
        raise EmolensError("no conditions to run")
    bank.check_model(lm)
    for condition in conditions:  # fail before any work on an unknown emotion or layer
        condition.steering(bank, allow_strong=True)
    out = Path(out)
    path = out / "results.jsonl"
    done = read_results(path, experiment.name).rows
    items = {item["id"]: digest(item) for item in experiment.items}
    model, bank_id = str(lm.fingerprint.get("weights")), bank.digest()
    _check_rows(path, done, items, model, bank_id)
    finished = {row["trial"] for row in done}
    pending = [t for t in experiment.plan(conditions, samples, seed) if t.id not in finished]
    groups: dict[Condition, list[Trial]] = {}
    for trial in pending:
        groups.setdefault(trial.condition, []).append(trial)
    chunks = [trials[start : start + batch_size] for trials in groups.values()
              for start in range(0, len(trials), batch_size)]  # fmt: skip
    execute = executor or run_here
    bar = tqdm(total=len(pending), unit="trial", desc=experiment.name, disable=not progress)
    with bar, AppendLog(path) as results:
        outcomes = execute(experiment, lm, bank, chunks)
        for chunk, (records, seconds) in zip(chunks, outcomes, strict=True):
            rows = [
                {"experiment": experiment.name, "trial": t.id, "item": t.item,
                 "item_digest": items[t.item["id"]], "condition": t.condition.to_json(),
                 "sample": t.sample, "seed": t.seed, **record, "seconds": round(seconds, 4),
                 "model": lm.fingerprint, "bank": bank_id, "emolens": __version__}
                for t, record in zip(chunk, records, strict=True)
            ]  # fmt: skip
            results.write(rows)
            done += rows
            bar.update(len(chunk))
    return summarize_rows(experiment, done, out, path)


def summarize_rows(
    experiment: Experiment,
    rows: list[dict],
    out: str | os.PathLike,
    results: str | os.PathLike | None = None,
) -> dict:
    """Summarise result rows into `out`: summary.json, the figures and page.html. With the
    `results` file they came from, the study's `annotate` rows are appended to it first."""
    if not rows:
        raise EmolensError(f"{experiment.name}: no results to summarise")
    out = Path(out)
    if results is not None:
        log = None
        try:
            for chunk in experiment.annotate(rows, Path(results)):
                log = log or AppendLog(results)  # opened only when there is something to add
                log.write(chunk)
                rows = [*rows, *chunk]
        finally:
            if log is not None:
                log.close()
    summary = experiment.summarize(rows)
    write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    figures = experiment.figures(summary, out)
    write_text(out / "page.html", experiment.page(summary, figures))
    return summary


def summarize_file(
    experiment: Experiment, results: str | os.PathLike, out: str | os.PathLike | None = None
) -> dict:
    """Re-summarise a results file without running anything (into its folder by default)."""
    path = Path(results)
    rows = read_results(path, experiment.name).rows
    return summarize_rows(experiment, rows, out if out is not None else path.parent, path)
