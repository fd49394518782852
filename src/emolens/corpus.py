"""Corpus records: schema, loading, validation (leaks, lengths, near-duplicates) and splits."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path

from emolens import concepts
from emolens.errors import EmolensError

FIELDS = ("id", "kind", "emotion", "topic", "text", "split", "source")
GENRES = ("message", "comment", "dialogue", "diary")  # the cross-genre texts (transfer.jsonl)
KINDS = ("story", "neutral", *GENRES)
SPLITS = {"story": ("train", "heldout"), "neutral": ("train", "heldout"),
          **{genre: ("train", "validation") for genre in GENRES}}  # fmt: skip
WORD_RANGE = {"story": (50, 150), "neutral": (20, 300), "message": (12, 80), "comment": (4, 50),
              "dialogue": (3, 45), "diary": (20, 90)}  # fmt: skip
NEAR_DUPLICATE = 0.3  # word 5-gram Jaccard at or above which two texts are near-duplicates
SIZE_GROUP_RATIO = 1.25  # duplicate index: kept texts grouped by 5-gram count, in this ratio
SHOWN_COPIES = 5  # further copies of a near-duplicate group listed in its problem
DEFAULT_FILES = ("stories.jsonl", "neutral.jsonl", "transfer.jsonl")
ROLE_PREFIXES = {"System: ": "system", "Human: ": "user", "Assistant: ": "assistant"}
_NON_LETTERS = re.compile(r"[^a-z]+")


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
    context: str = ""  # a dialogue line's one sentence of narrated context
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    def to_json(self) -> str:
        data = {name: getattr(self, name) for name in FIELDS}
        if self.context:
            data["context"] = self.context
        return json.dumps(data, ensure_ascii=False)


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
    return _NON_LETTERS.sub(" ", text.lower()).split()


@lru_cache(maxsize=1024)
def _normalized(banned: tuple[str, ...]) -> tuple[list[tuple[str, str]], int]:
    """Each banned phrase with its words joined by spaces, and the most words in one."""
    phrases = [(phrase, " ".join(words(phrase))) for phrase in banned]
    return phrases, max((normal.count(" ") + 1 for _, normal in phrases if normal), default=0)


def leaks(text: str, banned: Iterable[str]) -> list[str]:
    """The banned words or phrases that occur in `text` as whole word sequences."""
    phrases, longest = _normalized(tuple(banned))
    tokens = words(text)
    present = set().union(*(_grams(tokens, n) for n in range(1, longest + 1)))
    return [phrase for phrase, normal in phrases if normal in present]


def _grams(tokens: list[str], n: int) -> Iterator[str]:
    return map(" ".join, zip(*(tokens[k:] for k in range(n)), strict=False))


def shingles(text: str, n: int = 5) -> set[str]:
    """The word n-grams of a text, each as its words joined by spaces."""
    return set(_grams(words(text), n))


def jaccard(a: Set[str], b: Set[str]) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 0.0


class DuplicateIndex:
    """Kept texts, searchable for the near-duplicates of a new one.

    A text near-duplicates a kept one when their word 5-gram Jaccard is at least `threshold`;
    texts under 5 words have no 5-grams and duplicate nothing. Identical word sequences are
    found by hash. Otherwise the kept texts are grouped by their number of 5-grams r, and in
    each group only those that share one of the new text's rarest 5-grams are compared: a text
    with q 5-grams shares at least threshold * (q + r) / (1 + threshold) of them with any text
    it near-duplicates, so that many minus one of its most common 5-grams are skipped without
    missing one (prefix filtering). Those are the 5-grams whose lists of texts could be long: a
    shared preamble costs nothing unless it is nearly half of a text. Every match is confirmed
    by the exact Jaccard of the two 5-gram sets.
    """

    def __init__(self, threshold: float = NEAR_DUPLICATE) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.labels: list[object] = []
        self.grams: list[frozenset[str]] = []
        # size group -> 5-gram -> kept texts (their keys) of that group holding it
        self.postings: defaultdict[int, defaultdict[str, list[int]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.sizes: dict[int, tuple[int, int]] = {}  # size group -> fewest, most 5-grams in it
        self.exact: dict[bytes, object] = {}  # hash of a kept text's words -> its label

    def match(self, text: str) -> tuple[object, float] | None:
        """(label, Jaccard) of the kept text that `text` near-duplicates most, or None."""
        return self._match(*self._digest(text))

    def add(self, text: str, label: object = None) -> None:
        """Keep `text` under `label`, whatever it duplicates (a repeat of a kept text's words
        changes nothing)."""
        digest, grams = self._digest(text)
        self._add(digest, grams, label)

    def keep(self, text: str, label: object = None) -> tuple[object, float] | None:
        """Keep `text` under `label` unless it near-duplicates a kept text; that match, or None."""
        digest, grams = self._digest(text)
        found = self._match(digest, grams)
        if found is None:
            self._add(digest, grams, label)
        return found

    @staticmethod
    def _digest(text: str) -> tuple[bytes, frozenset[str]]:
        tokens = words(text)
        grams = frozenset(_grams(tokens, 5))
        return hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest(), grams

    @staticmethod
    def _group(size: int) -> int:
        return int(math.log(size, SIZE_GROUP_RATIO))

    def _ceiling(self, size: int, group: int) -> float:
        """The highest Jaccard a text of `size` 5-grams can have with one of `group`."""
        fewest, most = self.sizes[group]
        return most / size if most < size else size / fewest if fewest > size else 1.0

    def _add(self, digest: bytes, grams: frozenset[str], label: object) -> None:
        if not grams or digest in self.exact:
            return
        key, group = len(self.grams), self._group(len(grams))
        self.labels.append(label)
        self.grams.append(grams)
        postings = self.postings[group]
        for gram in grams:
            postings[gram].append(key)
        fewest, most = self.sizes.get(group, (len(grams), len(grams)))
        self.sizes[group] = min(fewest, len(grams)), max(most, len(grams))
        self.exact[digest] = label

    def _match(self, digest: bytes, grams: frozenset[str]) -> tuple[object, float] | None:
        if digest in self.exact:
            return self.exact[digest], 1.0
        if not grams:
            return None
        t, size, best = self.threshold, len(grams), None
        # a near-duplicate has between t * size and size / t 5-grams; the groups whose sizes
        # are nearest come first, so that a close match rules the farther ones out
        low, high = max(1, math.ceil(t * size - 1e-9)), math.floor(size / t + 1e-9)
        groups = [g for g in range(self._group(low), self._group(high) + 1) if g in self.sizes]
        for ceiling, group in sorted(((self._ceiling(size, g), g) for g in groups), reverse=True):
            if best is not None and ceiling <= best[1]:
                break
            postings, fewest = self.postings[group], max(low, self.sizes[group][0])
            skip = math.ceil(t * (size + fewest) / (1 + t) - 1e-9) - 1  # most common, unprobed
            indexed = postings.keys() & grams  # the others are rarer still
            if len(indexed) <= skip:
                continue
            rarest = sorted(indexed, key=lambda gram: len(postings[gram]))[: len(indexed) - skip]
            for key, count in Counter(chain.from_iterable(postings[g] for g in rarest)).items():
                other = self.grams[key]
                if count + skip < t * (size + len(other)) / (1 + t) - 1e-9:
                    continue  # even sharing every skipped 5-gram would fall short
                score = jaccard(grams, other)
                if score >= t and (best is None or score > best[1]):
                    best = (key, score)
        return None if best is None else (self.labels[best[0]], best[1])


def near_duplicate_groups(
    texts: Sequence[str], threshold: float = NEAR_DUPLICATE
) -> dict[int, list[tuple[int, float]]]:
    """Near-duplicates grouped under the earlier text they copy: {first: [(index, Jaccard)]}.

    Texts are taken in order and compared with the earlier texts that are not themselves
    near-duplicates (as generation keeps stories), so every listed pair meets `threshold` and
    removing every listed text leaves no near-duplicates.
    """
    index = DuplicateIndex(threshold)
    groups: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for i, text in enumerate(texts):
        found = index.keep(text, i)
        if found is not None:
            first, score = found
            groups[int(first)].append((i, score))  # type: ignore[call-overload]
    return dict(groups)


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
    except RecursionError:
        return Problem(path, number, "malformed JSON", "nested too deeply")
    if not isinstance(data, dict):
        return Problem(path, number, "malformed JSON", "a record must be a JSON object")
    missing = [name for name in FIELDS if name not in data]
    if missing:
        return Problem(path, number, "missing field", ", ".join(missing))
    wrong = [name for name in (*FIELDS, "context") if not isinstance(data.get(name, ""), str)]
    if wrong:
        return Problem(path, number, "wrong type", f"field(s) {', '.join(wrong)} must be strings")
    return Record(**{name: data[name] for name in FIELDS}, context=data.get("context", ""),
                  file=path, line=number)  # fmt: skip


def read_records(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """Parse one JSONL file; unparsable lines become problems. A file that cannot be read as
    UTF-8 text is an EmolensError naming its first bad line."""
    records: list[Record] = []
    problems: list[Problem] = []
    lines = io.StringIO(concepts.read_text(path), newline=None)  # \n, \r\n or \r line ends
    for number, line in enumerate(lines, 1):
        if line.strip():
            parsed = _parse_line(str(path), number, line)
            if isinstance(parsed, Record):
                records.append(parsed)
            else:
                problems.append(parsed)
    return records, problems


def corpus_files(path: str | os.PathLike | None = None) -> list[Path]:
    """The JSONL files of a corpus: the shipped one, a directory's *.jsonl, or one file."""
    if path is None or str(path) == "default":
        return [concepts.DATA / name for name in DEFAULT_FILES]
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not found:
            raise EmolensError(f"{path}: no .jsonl files in this directory")
        return found
    if not path.exists():
        raise EmolensError(f"{path}: no such corpus file or directory")
    if not path.is_file():
        raise EmolensError(f"{path}: not a regular file")
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
        if r.split not in SPLITS[r.kind]:
            allowed = ", ".join(SPLITS[r.kind])
            problems.append(Problem(*where, "unknown split", f"'{r.split}' (use {allowed})"))
        if r.kind != "neutral" and r.emotion not in known:
            problems.append(Problem(*where, "unknown emotion", f"'{r.emotion}'"))
        if bool(r.context.strip()) != (r.kind == "dialogue"):
            problems.append(Problem(*where, "context", "a dialogue line needs one sentence of "
                                    "context; other kinds have none"))  # fmt: skip
        low, high = WORD_RANGE[r.kind]
        count = len(r.text.split())
        if not low <= count <= high:
            problems.append(Problem(*where, "length", f"{count} words (allowed {low}-{high})"))
        own = banned.get(r.emotion, ()) if r.kind != "neutral" else every_banned
        found = leaks(f"{r.context} {r.text}", own)
        if found:
            problems.append(Problem(*where, "leak", f"forbidden word(s) {', '.join(found)}"))
        if r.kind == "neutral":
            problems.extend(_dialogue_problems(r))
    problems.extend(_split_problems(records))
    texts = [f"{r.context} {r.text}" if r.context else r.text for r in records]
    for head, copies in near_duplicate_groups(texts).items():
        problems.append(_duplicate_problem(records[head], [(records[i], j) for i, j in copies]))
    return problems


def _duplicate_problem(first: Record, copies: list[tuple[Record, float]]) -> Problem:
    """One problem for a group of near-duplicates, at the first copy."""
    (copy, score), others = copies[0], [r for r, _ in copies[1:]]
    message = f"of {first.id} ({first.file}:{first.line}), 5-gram Jaccard {score:.2f}"
    if others:
        places = [str(r.line) if r.file == copy.file else f"{r.file}:{r.line}" for r in others]
        listed = ", ".join(places[:SHOWN_COPIES]) + (", ..." if len(places) > SHOWN_COPIES else "")
        message += f" (and {len(others)} other near-duplicate(s) of it: line(s) {listed})"
    return Problem(copy.file, copy.line, "near-duplicate", message)


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
    """Parse and validate a corpus; returns its records and every problem found. A corpus
    without a single line of text is an EmolensError."""
    records, problems = [], []
    files = corpus_files(path)
    for file in files:
        found, bad = read_records(file)
        records += found
        problems += bad
    if not records and not problems:
        where = files[0] if len(files) == 1 else path
        raise EmolensError(f"{where}: the corpus has no records (empty or only blank lines)")
    return records, problems + validate(records)


def build_warnings(records: Sequence[Record]) -> list[str]:
    """Why valid records are not yet a corpus that `emolens build` accepts: it needs training
    stories for the emotion vectors and neutral dialogues for denoising."""
    missing = []
    if not any(r.kind == "story" and r.split == "train" for r in records):
        missing.append("training stories")
    if not any(r.kind == "neutral" for r in records):
        missing.append("neutral dialogues (denoising needs them)")
    if not missing:
        return []
    return [f"no {' and no '.join(missing)}: `emolens build` cannot use this corpus alone"]


@dataclass
class Corpus:
    """A validated corpus."""

    records: list[Record]

    def stories(self, split: str | None = None) -> list[Record]:
        return [r for r in self.records if r.kind == "story" and split in (None, r.split)]

    def neutral(self) -> list[Record]:
        return [r for r in self.records if r.kind == "neutral"]

    def genres(self, split: str | None = None) -> list[Record]:
        """The cross-genre texts (messages, comments, dialogue lines, diary entries)."""
        return [r for r in self.records if r.kind in GENRES and split in (None, r.split)]

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
        topic_count = (
            f"   topics {len({r.topic for r in group})}" if kind in ("story", "neutral") else ""
        )
        lines.append(
            f"{kind:<8} {len(group):>6} texts   words min {min(lengths)} / median "
            f"{statistics.median(lengths):.0f} / max {max(lengths)}{topic_count}"
        )
    stories = [r for r in records if r.kind == "story"]
    if stories:
        per: dict[str, Counter] = defaultdict(Counter)
        for r in stories:
            per[r.emotion][r.split] += 1
        lines.append(f"emotions {len(per):>6} with stories")
        for split in SPLITS["story"]:
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
    genres = [r for r in records if r.kind in GENRES]
    for split in ("validation", "train"):
        chosen = [r for r in genres if r.split == split]
        if chosen:
            emotions = {r.emotion for r in chosen}
            lines.append(f"cross-genre {split}: {len(chosen)} texts, {len(emotions)} emotions "
                         f"({', '.join(f'{g} {sum(r.kind == g for r in chosen)}' for g in GENRES)})")  # fmt: skip
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
