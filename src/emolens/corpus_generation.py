"""Corpus generation: a model writes emotion stories with the study's recipe (METHOD.md 2).

One prompt per emotion x topic asks for N numbered one-paragraph stories in which a character
feels the emotion without it ever being named. The reply is parsed into stories; leaks,
stories outside the word range and near-duplicates (by `emolens corpus check`'s rule, of what
is already in the output or kept earlier in the run) are dropped. Kept stories are appended to
a JSONL file, one pair at a time; a sidecar `OUT.done` lists finished pairs, so a re-run
resumes where the last one ended.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from emolens import concepts
from emolens.atomic import atomic_path
from emolens.backends import Backend
from emolens.corpus import WORD_RANGE, DuplicateIndex, Record, leaks
from emolens.errors import EmolensError

REASONS = ("leak", "length", "duplicate", "unparsable")
ID_PREFIX = "gen-"
TOKENS_PER_STORY = 200  # default generation budget per requested story
_MARKER = re.compile(
    r"^[ \t>#*_]*(?:story[ \t]*)?(\d{1,2})"  # markdown, an optional "Story", the number
    r"(?:[ \t]*[.):\-–—]|\*\*|[ \t]*$)",  # then punctuation, a closing "**" or the line end
    re.I | re.M,
)
_BOLD_TITLE = re.compile(r"^\s*(\*\*|__)[^*_\n]{1,80}?\1[ \t]*[:.\-–—]?")
_SENTENCE_END = tuple(".!?\"')”’")


def prompt(emotion: str, topic: str, count: int) -> list[dict]:
    """The chat that asks for `count` stories about `topic` in which a character feels
    `emotion`, conveyed only indirectly."""
    if count == 1:
        ask, each = "one story", "the story"
        rules = ['Write it in the first person ("I") or the third person.']
        numbering = 'Start the story with "1."'
    else:
        ask, each = f"{count} different stories", "each story"
        rules = [
            'Use the first person ("I") in some stories and the third person in others.',
            "Give every story its own character, situation and wording.",
        ]
        numbering = f'Number the stories "1." to "{count}."'
    rules = [
        f"{each.capitalize()} is a single paragraph of 60 to 130 words.",
        f'Never write "{emotion}" or any synonym of it. Show the feeling only through what the '
        "character does, how their body reacts, what they say and what they think.",
        *rules,
        f"{numbering} and write nothing else: no titles, no comments.",
    ]
    content = f"Write {ask} about {topic}. In {each}, a character feels {emotion}.\n"
    return [{"role": "user", "content": content + "\n".join(f"- {rule}" for rule in rules)}]


def parse_stories(reply: str) -> list[str | None]:
    """The stories of a reply, in order, each reduced to its first paragraph on one line.

    Items are found by line-initial numbers counting up from 1 ("1.", "2)", "**Story 3:**");
    a reply with no numbered item is one item. Titles and preambles ("Here are...:") are
    dropped. An item with no text, or cut off mid-sentence, is None.
    """
    starts, expected = [], 1
    for match in _MARKER.finditer(reply):
        if int(match.group(1)) == expected:
            starts.append(match)
            expected += 1
    if not starts:
        return [_clean(reply)]
    ends = [m.start() for m in starts[1:]] + [len(reply)]
    return [_clean(reply[m.end() : end]) for m, end in zip(starts, ends, strict=True)]


def _clean(item: str) -> str | None:
    lines = _BOLD_TITLE.sub("", item).replace("**", "").replace("__", "").strip().splitlines()
    while len(lines) > 1 and _is_heading(lines[0]):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line.strip():
            break
        paragraph.append(line)
    story = " ".join(" ".join(paragraph).split())
    return story if story.endswith(_SENTENCE_END) else None


def _is_heading(line: str) -> bool:
    """A blank line, a title (short, no closing punctuation) or a preamble ending in ':'."""
    line = line.strip()
    short = len(line.split()) <= 10 and not line.endswith(_SENTENCE_END)
    return not line or line.endswith(":") or short


def screen(story: str | None, emotion: str, seen: DuplicateIndex) -> str | None:
    """Why a parsed story is rejected (one of REASONS), or None if it may be kept."""
    if story is None:
        return "unparsable"
    if leaks(story, concepts.forbidden()[emotion]):
        return "leak"
    low, high = WORD_RANGE["story"]
    if not low <= len(story.split()) <= high:
        return "length"
    if seen.match(story) is not None:
        return "duplicate"
    return None


@dataclass
class Tally:
    """What a generation run did: pairs finished, stories kept and rejected by reason."""

    pairs: int = 0
    skipped: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    rebuilt: int = 0  # finished pairs read from the output because its .done was missing

    @property
    def parsed(self) -> int:
        """Every story parsed from the replies: kept plus rejected."""
        return self.kept + sum(self.rejected.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {self.rejected[reason]}" for reason in REASONS)
        rebuilt = (
            f"the .done list was missing: rebuilt from the output as {self.rebuilt} pair(s)\n"
            if self.rebuilt
            else ""
        )
        return (
            f"{rebuilt}pairs done: {self.pairs} (skipped as already done: {self.skipped})\n"
            f"stories parsed: {self.parsed}, kept: {self.kept}, "
            f"rejected: {sum(self.rejected.values())} ({reasons})"
        )


def pick_emotions(spec: str | Sequence[str] | None) -> list[str]:
    """Emotions from a comma list (or a sequence); None means all 171 in the study's order."""
    known = concepts.emotions()
    if spec is None:
        return list(known)
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise EmolensError(
            f"unknown emotion(s): {', '.join(map(repr, unknown)) or 'none given'} "
            "(see src/emolens/data/emotions.txt)"
        )
    return list(dict.fromkeys(names))


def pick_topics(spec: str | Sequence[int | str] | None) -> list[int]:
    """Indices of shipped topics from a comma list of indices or names; None means all."""
    topics = concepts.topics()
    if spec is None:
        return list(range(len(topics)))
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    picked = []
    for item in items:
        if isinstance(item, int) or item.isdigit():
            index = int(item)
        elif item in topics:
            index = topics.index(item)
        else:
            raise EmolensError(
                f"unknown topic {item!r}: give an index 0-{len(topics) - 1} or a name from "
                "src/emolens/data/topics.txt"
            )
        if not 0 <= index < len(topics):
            raise EmolensError(f"topic index {index} out of range 0-{len(topics) - 1}")
        picked.append(index)
    return list(dict.fromkeys(picked))


def slug(emotion: str) -> str:
    """An id-safe form of an emotion name ("at ease" -> "at-ease")."""
    return re.sub(r"[^a-z0-9]+", "-", emotion.lower()).strip("-")


def generate(
    backend: Backend,
    out: str | os.PathLike,
    *,
    emotions: str | Sequence[str] | None = None,
    topics: str | Sequence[int | str] | None = None,
    heldout_topics: str | Sequence[int | str] = (),
    per_topic: int = 4,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    seed: int | None = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> Tally:
    """Have `backend` write stories for every emotion x topic pair not yet done in `out`.

    Emotions and topics are as `pick_emotions` and `pick_topics` take them (None: all). Kept
    stories are appended to `out` (JSONL records, kind "story", split "heldout" for
    `heldout_topics`, else "train", source `backend.name`) and each finished pair to
    `out.done`. Before that, generated records (ids starting with ID_PREFIX) of the pairs this
    run is about to write are removed: a crash left them without their `out.done` line. No
    other line of `out` is ever removed. `batch_size` prompts are sent to the backend
    together; `max_new_tokens` defaults to TOKENS_PER_STORY per requested story.

    A missing `out.done` (the output was moved or copied without it) is rebuilt from the
    generated records in `out`, every pair found there counting as finished. Rebuilding keeps
    every story and resumes where the file ends; its one cost is that a pair cut short by a
    crash just before the move keeps its partial stories. Refusing instead would leave the user
    to write the sidecar by hand, and guessing wrong there is how stories were lost.
    """
    emotions = pick_emotions(emotions)
    topics = pick_topics(topics)
    counts = {"per_topic": per_topic, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise EmolensError(f"{name} must be at least 1, got {value}")
    if temperature < 0:
        raise EmolensError(f"temperature must be at least 0, got {temperature}")
    max_new_tokens = max_new_tokens or TOKENS_PER_STORY * per_topic
    heldout = set(pick_topics(heldout_topics)) if heldout_topics else set()
    names = concepts.topics()

    out = Path(out)
    if out.is_dir():
        raise EmolensError(f"{out}: is a directory; give the output .jsonl file")
    out.parent.mkdir(parents=True, exist_ok=True)
    done_path = out.with_name(out.name + ".done")
    rows, torn = _read_lines(out)
    tally = Tally()
    if done_path.exists():
        finished = _read_done(done_path)
    else:
        finished = _rebuild_done(done_path, rows)
        tally.rebuilt = len(finished)
    pairs = [(e, t) for e in emotions for t in topics]
    todo = [(n, e, t) for n, (e, t) in enumerate(pairs) if (e, names[t]) not in finished]
    tally.skipped = len(pairs) - len(todo)
    seen = DuplicateIndex()
    for text in _recover(out, rows, torn, {(e, names[t]) for _, e, t in todo}):
        seen.keep(text)
    bar = tqdm(total=len(todo), unit="pair", desc="generate", disable=not progress)
    with (
        bar,
        open(out, "a", encoding="utf-8") as records,
        open(done_path, "a", encoding="utf-8") as done,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            replies = backend.complete(
                [prompt(e, names[t], per_topic) for _, e, t in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=None if seed is None else seed + batch[0][0],
            )
            if len(replies) != len(batch):
                raise EmolensError(
                    f"backend {backend.name!r} gave {len(replies)} replies to {len(batch)} prompts"
                )
            for (_, emotion, topic), reply in zip(batch, replies, strict=True):
                split = "heldout" if topic in heldout else "train"
                kept: list[Record] = []
                rejected: Counter[str] = Counter()
                for number, story in enumerate(parse_stories(reply), 1):
                    reason = screen(story, emotion, seen)
                    if reason:
                        rejected[reason] += 1
                        continue
                    assert story is not None, "screen rejects unparsable (None) stories"
                    seen.add(story)
                    id_ = f"{ID_PREFIX}{slug(emotion)}-{topic:03d}-{number}"
                    kept.append(
                        Record(id_, "story", emotion, names[topic], story, split, backend.name)
                    )
                _append(records, [r.to_json() for r in kept])
                outcome = {"kept": len(kept), "rejected": {r: rejected[r] for r in REASONS}}
                _append(done, [json.dumps({"emotion": emotion, "topic": names[topic], **outcome})])
                tally.pairs += 1
                tally.kept += len(kept)
                tally.rejected += rejected
                bar.set_postfix(kept=tally.kept, rejected=sum(tally.rejected.values()))
                bar.update()
    return tally


def _append(handle: TextIO, lines: list[str]) -> None:
    """Write whole lines and force them to disk, so a crash leaves at most a partial line."""
    handle.write("".join(line + "\n" for line in lines))
    handle.flush()
    os.fsync(handle.fileno())


def _read_lines(path: Path) -> tuple[list[tuple[str, object]], bool]:
    """(raw line, parsed JSON) pairs of a JSONL file, and whether it needs a rewrite: a
    partial last line (from a crash) is dropped, and the file must end with a newline."""
    if not path.exists():
        return [], False
    text = concepts.read_text(path)
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and the like
    if lines[-1] == "":
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as error:
            if number == len(lines) and not text.endswith("\n"):
                return rows, True
            why = getattr(error, "msg", "nested too deeply")
            raise EmolensError(f"{path}:{number}: malformed JSON ({why})") from None
    return rows, bool(text) and not text.endswith("\n")


def _read_done(path: Path) -> set[tuple[str, str]]:
    """The (emotion, topic) pairs the sidecar lists as finished."""
    rows, rewrite = _read_lines(path)
    finished = set()
    for number, (_, data) in enumerate(rows, 1):
        if not (
            isinstance(data, dict)
            and all(isinstance(data.get(k), str) for k in ("emotion", "topic"))
        ):
            raise EmolensError(f"{path}:{number}: expected an object with 'emotion' and 'topic'")
        finished.add((data["emotion"], data["topic"]))
    if rewrite:
        _rewrite(path, [line for line, _ in rows])
    return finished


def _generated_pair(data: object) -> tuple[str, str] | None:
    """The (emotion, topic) of a generated record; None for any other line."""
    if isinstance(data, dict) and str(data.get("id", "")).startswith(ID_PREFIX):
        emotion, topic = data.get("emotion"), data.get("topic")
        if isinstance(emotion, str) and isinstance(topic, str):
            return emotion, topic
    return None


def _rebuild_done(path: Path, rows: list[tuple[str, object]]) -> set[tuple[str, str]]:
    """Write a sidecar listing every pair that has generated records in `rows`; those pairs."""
    kept = Counter(pair for _, d in rows if (pair := _generated_pair(d)))
    lines = [
        json.dumps({"emotion": emotion, "topic": topic, "kept": count, "rebuilt": True})
        for (emotion, topic), count in kept.items()
    ]
    if lines:
        _rewrite(path, lines)
    return set(kept)


def _recover(
    out: Path, rows: list[tuple[str, object]], torn: bool, redo: set[tuple[str, str]]
) -> list[str]:
    """Remove from `out` a torn last line and the generated records of the pairs in `redo`
    (written by a run that crashed before finishing them); return the texts it keeps."""
    keep = [(line, data) for line, data in rows if _generated_pair(data) not in redo]
    if torn or len(keep) < len(rows):
        _rewrite(out, [line for line, _ in keep])
    return [d["text"] for _, d in keep if isinstance(d, dict) and isinstance(d.get("text"), str)]


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace a file's lines atomically (a temporary file beside it, then a rename)."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8") as file:
        _append(file, lines)
