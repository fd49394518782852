"""Corpus records: schema, loading, validation (leaks, lengths, near-duplicates) and splits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emolens import concepts
from emolens.errors import EmolensError

FIELDS = ("id", "kind", "emotion", "topic", "text", "split", "source")
KINDS = ("story", "neutral")
SPLITS = ("train", "heldout")
WORD_RANGE = {"story": (50, 150), "neutral": (20, 300)}
NEAR_DUPLICATE = 0.3  # word 5-gram Jaccard at or above which two texts are near-duplicates
DEFAULT_FILES = ("stories.jsonl", "neutral.jsonl")
ROLE_PREFIXES = {"System: ": "system", "Human: ": "user", "Assistant: ": "assistant"}


@dataclass(frozen=True)
class Record:
    """One corpus text and where it came from."""

    id: str
    kind: str
    emotion: str
    topic: str
    text: str
    split: str
    source: str
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in FIELDS}, ensure_ascii=False)


@dataclass(frozen=True)
class Problem:
    """A rule a record breaks, with its place."""

    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.message}"


def words(text: str) -> list[str]:
    """Lower-case letter runs: the unit of leak and duplicate checks."""
    return re.sub(r"[^a-z]+", " ", text.lower()).split()


def leaks(text: str, banned: Iterable[str]) -> list[str]:
    """The banned words or phrases that occur in `text` as whole word sequences."""
    padded = f" {' '.join(words(text))} "
    return [phrase for phrase in banned if f" {' '.join(words(phrase))} " in padded]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def near_duplicates(
    texts: Sequence[str], threshold: float = NEAR_DUPLICATE
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of texts whose word 5-gram Jaccard is at least `threshold`."""
    sets = [shingles(text) for text in texts]
    postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, grams in enumerate(sets):
        for gram in grams:
            postings[gram].append(index)
    pairs = []
    for i, grams in enumerate(sets):
        shared = Counter(j for gram in grams for j in postings[gram] if j > i)
        for j, inter in shared.items():
            jaccard = inter / (len(grams) + len(sets[j]) - inter)
            if jaccard >= threshold:
                pairs.append((i, j, jaccard))
    return pairs


def dialogue_messages(text: str) -> list[dict[str, str]]:
    """Split a plain "System:/Human:/Assistant:" transcript into chat messages."""
    messages: list[dict[str, str]] = []
    for paragraph in text.split("\n\n"):
        prefix = next((p for p in ROLE_PREFIXES if paragraph.startswith(p)), None)
        if prefix:
            messages.append({"role": ROLE_PREFIXES[prefix], "content": paragraph[len(prefix) :]})
        elif messages:
            messages[-1]["content"] += "\n\n" + paragraph
        else:
            raise ValueError("a dialogue must start with 'System: ' or 'Human: '")
    return messages


def _parse_line(path: str, number: int, line: str) -> Record | Problem:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        return Problem(path, number, "malformed JSON", error.msg)
    if not isinstance(data, dict):
        return Problem(path, number, "malformed JSON", "a record must be a JSON object")
    missing = [name for name in FIELDS if name not in data]
    if missing:
        return Problem(path, number, "missing field", ", ".join(missing))
    wrong = [name for name in FIELDS if not isinstance(data[name], str)]
    if wrong:
        return Problem(path, number, "wrong type", f"field(s) {', '.join(wrong)} must be strings")
    return Record(**{name: data[name] for name in FIELDS}, file=path, line=number)


def read_records(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """Parse one JSONL file; unreadable lines become problems, never exceptions."""
    records, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                parsed = _parse_line(str(path), number, line)
                (records if isinstance(parsed, Record) else problems).append(parsed)
    return records, problems


def corpus_files(path: str | os.PathLike | None = None) -> list[Path]:
    """The JSONL files of a corpus: the shipped one, a directory's *.jsonl, or one file."""
    if path is None or str(path) == "default":
        return [concepts.DATA / name for name in DEFAULT_FILES]
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        if not found:
            raise EmolensError(f"{path}: no .jsonl files in this directory")
        return found
    if not path.is_file():
        raise EmolensError(f"{path}: no such corpus file or directory")
    return [path]


def validate(records: Sequence[Record]) -> list[Problem]:
    """Every rule a list of parsed records breaks, each with its file and line."""
    known = set(concepts.emotions())
    banned = concepts.forbidden()
    every_banned = sorted({w for ws in banned.values() for w in ws} | known)
    problems = []
    seen: dict[str, Record] = {}
    for r in records:
        where = (r.file, r.line)
        if r.id in seen:
            first = seen[r.id]
            problems.append(
                Problem(*where, "duplicate id", f"'{r.id}' (first at line {first.line})")
            )
        seen.setdefault(r.id, r)
        if r.kind not in KINDS:
            problems.append(Problem(*where, "unknown kind", f"'{r.kind}' (use {', '.join(KINDS)})"))
            continue
        if r.split not in SPLITS:
            problems.append(Problem(*where, "unknown split", f"'{r.split}' (use train, heldout)"))
        if r.kind == "story" and r.emotion not in known:
            problems.append(Problem(*where, "unknown emotion", f"'{r.emotion}'"))
        low, high = WORD_RANGE[r.kind]
        count = len(r.text.split())
        if not low <= count <= high:
            problems.append(Problem(*where, "length", f"{count} words (allowed {low}-{high})"))
        found = leaks(r.text, banned.get(r.emotion, ()) if r.kind == "story" else every_banned)
        if found:
            problems.append(Problem(*where, "leak", f"forbidden word(s) {', '.join(found)}"))
        if r.kind == "neutral":
            problems.extend(_dialogue_problems(r))
    problems.extend(_split_problems(records))
    for i, j, jaccard in near_duplicates([r.text for r in records]):
        a, b = records[i], records[j]
        problems.append(
            Problem(b.file, b.line, "near-duplicate", f"of {a.id} ({a.file}:{a.line}), 5-gram Jaccard {jaccard:.2f}")
        )  # fmt: skip
    return problems


def _dialogue_problems(record: Record) -> list[Problem]:
    try:
        messages = dialogue_messages(record.text)
    except ValueError as error:
        return [Problem(record.file, record.line, "dialogue format", str(error))]
    turns = [m["role"] for m in messages if m["role"] != "system"]
    expected = ["user", "assistant"] * 3
    if not 2 <= len(turns) <= 6 or turns != expected[: len(turns)]:
        return [
            Problem(
                record.file, record.line, "dialogue format",
                f"needs 2-6 alternating Human/Assistant messages, got {' '.join(turns) or 'none'}",
            )
        ]  # fmt: skip
    return []


def _split_problems(records: Sequence[Record]) -> list[Problem]:
    """Held-out stories must use topics absent from the same emotion's training stories."""
    train_topics = defaultdict(set)
    for r in records:
        if r.kind == "story" and r.split == "train":
            train_topics[r.emotion].add(r.topic)
    return [
        Problem(r.file, r.line, "split leak", f"held-out topic '{r.topic}' is also a training topic of '{r.emotion}'")
        for r in records
        if r.kind == "story" and r.split == "heldout" and r.topic in train_topics[r.emotion]
    ]  # fmt: skip


def check(path: str | os.PathLike | None = None) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a corpus; returns its records and every problem found."""
    records, problems = [], []
    for file in corpus_files(path):
        found, bad = read_records(file)
        records += found
        problems += bad
    return records, problems + validate(records)


@dataclass
class Corpus:
    """A validated corpus."""

    records: list[Record]

    def stories(self, split: str | None = None) -> list[Record]:
        return [r for r in self.records if r.kind == "story" and split in (None, r.split)]

    def neutral(self) -> list[Record]:
        return [r for r in self.records if r.kind == "neutral"]

    def emotions(self) -> list[str]:
        """Emotions with training stories, in the study's order."""
        present = {r.emotion for r in self.stories("train")}
        return [e for e in concepts.emotions() if e in present]

    def digest(self) -> str:
        """A hash of the texts and labels: what a bank was built from."""
        digest = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.id):
            digest.update(r.to_json().encode())
        return digest.hexdigest()[:16]


def load(path: str | os.PathLike | None = None, *, max_problems: int = 20) -> Corpus:
    """Load and validate a corpus, raising one error that lists its problems."""
    records, problems = check(path)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:max_problems])
        more = (
            f"\n  ... and {len(problems) - max_problems} more"
            if len(problems) > max_problems
            else ""
        )
        raise EmolensError(f"the corpus has {len(problems)} problem(s):\n  {shown}{more}")
    if not any(r.kind == "story" for r in records):
        raise EmolensError("the corpus has no stories")
    return Corpus(records)


def summary(records: Sequence[Record]) -> str:
    """A readable table: counts per split, per-emotion spread, lengths and topics."""
    lines = []
    for kind in KINDS:
        group = [r for r in records if r.kind == kind]
        if not group:
            continue
        lengths = [len(r.text.split()) for r in group]
        lines.append(
            f"{kind:<8} {len(group):>6} texts   words min {min(lengths)} / median "
            f"{statistics.median(lengths):.0f} / max {max(lengths)}   topics {len({r.topic for r in group})}"
        )
    stories = [r for r in records if r.kind == "story"]
    if stories:
        per = defaultdict(Counter)
        for r in stories:
            per[r.emotion][r.split] += 1
        lines.append(f"emotions {len(per):>6} with stories")
        for split in SPLITS:
            counts = [per[e][split] for e in per]
            lines.append(
                f"  {split:<8} per emotion: min {min(counts)} / median {statistics.median(counts):.0f}"
                f" / max {max(counts)}   total {sum(counts)}"
            )
        topics = defaultdict(set)
        for r in stories:
            if r.split == "train":
                topics[r.emotion].add(r.topic)
        spread = [len(t) for t in topics.values()] or [0]
        lines.append(
            f"  distinct training topics per emotion: min {min(spread)} / max {max(spread)}"
        )
        first = sum(bool(re.search(r"\b(I|I'm|I'd|I've|my|me)\b", r.text)) for r in stories)
        lines.append(f"  first-person narration (approx.): {first / len(stories):.0%}")
    return "\n".join(lines)


def scenarios(path: str | os.PathLike | None = None) -> list[dict]:
    """Implicit scenarios: user messages tagged with the emotion they evoke."""
    path = Path(path) if path else concepts.DATA / "scenarios.jsonl"
    rows = concepts.load_jsonl(path, {"id": str, "emotion": str, "text": str})
    for number, row in enumerate(rows, 1):
        if row["emotion"] not in concepts.emotions():
            raise EmolensError(
                f"{path}:{number}: field 'emotion': unknown emotion '{row['emotion']}'"
            )
    return rows


def templates(path: str | os.PathLike | None = None) -> list[dict]:
    """Intensity templates: one {X} slot, values from benign to extreme, expected directions."""
    path = Path(path) if path else concepts.DATA / "templates.jsonl"
    rows = concepts.load_jsonl(path, {"id": str, "template": str, "values": list, "expect": dict})
    for number, row in enumerate(rows, 1):
        if row["template"].count("{X}") != 1:
            raise EmolensError(f"{path}:{number}: field 'template' needs exactly one {{X}} slot")
        for emotion, direction in row["expect"].items():
            if emotion not in concepts.emotions() or direction not in ("up", "down"):
                raise EmolensError(
                    f"{path}:{number}: field 'expect': '{emotion}: {direction}' must map a known "
                    "emotion to 'up' or 'down'"
                )
    return rows
