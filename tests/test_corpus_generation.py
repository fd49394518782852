import json
import random
import re

import pytest
import torch

from emolens import concepts, corpus
from emolens.backends import LocalBackend
from emolens.cli import main
from emolens.corpus import DuplicateIndex
from emolens.corpus_generation import (
    REASONS,
    generate,
    parse_stories,
    pick_emotions,
    pick_topics,
    prompt,
)
from emolens.errors import EmolensError

EMOTIONS = ["afraid", "at ease"]
VOCAB = (
    "the a she he they walked toward window table kitchen bread river door street morning "
    "evening letter phone car bus station garden chair coffee cup paper book shelf road bridge "
    "market bag coat shoe hand shoulder glass light lamp stair roof wall field tree stone rain "
    "wind cloud hill town corner bench ticket clock minute hour sister brother neighbor friend "
    "teacher doctor baker driver counted opened closed lifted carried folded turned watched "
    "listened waited stood sat slowly quickly again later then before after under over beside"
).split()


def story(seed: int, words: int = 80) -> str:
    """A distinct, leak-free text of `words` words (random word sequences share no 5-grams)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words)).capitalize() + "."


class FakeBackend:
    """Canned replies per emotion x topic, recording every prompt it is asked."""

    name = "fake-writer"

    def __init__(self, per_topic: int = 6):
        self.per_topic = per_topic
        self.asked: list[tuple[str, str]] = []
        self.lookup = {
            prompt(e, t, per_topic)[-1]["content"]: (e, t)
            for e in concepts.emotions()
            for t in concepts.topics()[:4]
        }

    def complete(self, prompts, *, max_new_tokens, temperature, seed):
        replies = []
        for messages in prompts:
            emotion, topic = self.lookup[messages[-1]["content"]]
            self.asked.append((emotion, topic))
            replies.append(self.reply(emotion, topic))
        return replies

    @staticmethod
    def seed(emotion: str, topic: str) -> int:
        return 1000 * concepts.emotions().index(emotion) + 10 * concepts.topics().index(topic)

    def good(self, emotion: str, topic: str) -> tuple[str, str]:
        return story(self.seed(emotion, topic)), story(self.seed(emotion, topic) + 1)

    def reply(self, emotion: str, topic: str) -> str:
        first, second = self.good(emotion, topic)
        leak = story(self.seed(emotion, topic) + 2)[:-1] + f" and felt {emotion}."
        near = first[:-1] + " again."
        return (
            "Here are the stories:\n\n"
            f"1. {first}\n\n"
            f"2. {leak}\n\n"
            "3. She left early.\n\n"
            f"4. {near}\n\n"
            f"5. **The Visit**\n{second}\n\n"
            "6. It was late and she"  # cut off by the token limit
        )


@pytest.fixture
def fake():
    return FakeBackend()


def run(backend, out, **options):
    options = {"emotions": EMOTIONS, "topics": [0, 1], "per_topic": 6, "progress": False} | options
    return generate(backend, out, **options)


def test_parse_numbered_formats():
    text = "She set the cup down and stared at the door."
    assert parse_stories(f"1. {text}\n2) {text}\n**Story 3:** {text}") == [text] * 3
    assert parse_stories(f"Sure! Here you go:\n\n### Story 1\nA Title\n{text}\n") == [text]
    assert parse_stories(f"1. **Title**: {text}\n\n2.\n{text}\nsecond line.") == [
        text,
        f"{text} second line.",
    ]
    # numbers must count up from 1; other line-initial numbers belong to the text
    assert parse_stories(f"1. {text}\n3. {text}") == [f"{text} 3. {text}"]
    # only the first paragraph is kept; a trailing comment is not part of the story
    assert parse_stories(f"1. {text}\n\nI hope you liked it!") == [text]


def test_parse_unnumbered_empty_and_cut_off():
    text = "He laughed and waved from the bus."
    assert parse_stories(text) == [text]
    assert parse_stories("") == [None]
    assert parse_stories(f"1. {text}\n2. \n3. and then she") == [text, None, None]


def test_duplicate_index_matches_corpus_rule():
    texts = [story(1), story(1)[:-1] + " again.", story(2)]
    index = DuplicateIndex()
    index.add(texts[0], "first")
    assert index.match(texts[1])[0] == "first" and index.match(texts[2]) is None
    assert index.match(texts[0].upper()) == ("first", 1.0)
    assert {
        first: [i for i, _ in copies]
        for first, copies in corpus.near_duplicate_groups(texts).items()
    } == {0: [1]}


def test_filter_keeps_the_good_stories_and_counts_reasons(tmp_path, fake):
    out = tmp_path / "gen.jsonl"
    tally = run(fake, out, heldout_topics=[1])
    records, problems = corpus.read_records(out)
    assert problems == []
    # items 1 and 5 of each reply are kept; 2-4 and 6 are rejected, one per reason
    expected = {(e, t): fake.good(e, t) for e in EMOTIONS for t in concepts.topics()[:2]}
    kept = {}
    for r in records:
        kept.setdefault((r.emotion, r.topic), []).append(r.text)
    assert {k: tuple(v) for k, v in kept.items()} == expected
    assert tally.pairs == 4 and tally.skipped == 0 and tally.kept == 8
    assert tally.rejected == {reason: 4 for reason in REASONS}
    assert tally.parsed == 4 * 6
    assert corpus.validate(records) == []
    assert {r.source for r in records} == {"fake-writer"}
    assert {(r.topic, r.split) for r in records} == {
        (concepts.topics()[0], "train"),
        (concepts.topics()[1], "heldout"),
    }
    assert "gen-at-ease-001-5" in {r.id for r in records}
    done = [json.loads(line) for line in (tmp_path / "gen.jsonl.done").read_text().splitlines()]
    assert [d["kept"] for d in done] == [2] * 4
    assert all(d["rejected"] == dict.fromkeys(REASONS, 1) for d in done)
    assert "kept: 8" in tally.summary() and "duplicate 4" in tally.summary()


def test_resume_skips_finished_pairs_including_empty_ones(tmp_path, fake):
    class Silent(FakeBackend):
        def reply(self, emotion, topic):
            return ""

    out = tmp_path / "gen.jsonl"
    silent = Silent()
    assert run(silent, out).kept == 0
    assert out.read_text() == "" and len(silent.asked) == 4
    run(fake, out, topics=[0, 1, 2])
    assert fake.asked == [(e, concepts.topics()[2]) for e in EMOTIONS]
    again = FakeBackend()
    tally = run(again, out, topics=[0, 1, 2])
    assert again.asked == [] and tally.skipped == 6 and tally.pairs == 0


def test_resume_removes_a_crashed_pairs_partial_records(tmp_path, fake):
    out, done = tmp_path / "gen.jsonl", tmp_path / "gen.jsonl.done"
    run(fake, out)
    complete = out.read_text()
    lines = done.read_text().splitlines()
    crashed = json.loads(lines[-1])
    done.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # a half-written sidecar line
    with open(out, "a") as handle:
        handle.write('{"id": "gen-afraid-000-9", "kind": "st')  # a half-written record
    again = FakeBackend()
    run(again, out)
    assert again.asked == [(crashed["emotion"], crashed["topic"])]
    assert out.read_text() == complete
    assert len(done.read_text().splitlines()) == 4
    records, problems = corpus.read_records(out)
    assert problems == [] and corpus.validate(records) == []


def test_a_moved_output_without_its_sidecar_keeps_every_story(tmp_path, fake):
    out = tmp_path / "moved.jsonl"
    calm = concepts.topics()[0]
    mine = [
        corpus.Record(f"gen-calm-000-{n}", "story", "calm", calm, story(50 + n), "train", "me")
        for n in (1, 2)
    ]
    out.write_text("".join(r.to_json() + "\n" for r in mine))
    tally = run(fake, out, emotions=["afraid"], topics=[0])
    records, _ = corpus.read_records(out)
    assert records[:2] == mine and len(records) == 2 + tally.kept == 4
    done = [json.loads(line) for line in (tmp_path / "moved.jsonl.done").read_text().splitlines()]
    assert [(d["emotion"], d["kept"]) for d in done] == [("calm", 2), ("afraid", 2)]
    assert "rebuilt from the output as 1 pair(s)" in tally.summary()
    again = FakeBackend()
    assert run(again, out, emotions=["calm", "afraid"], topics=[0]).skipped == 2
    assert again.asked == [] and corpus.read_records(out)[0] == records


def test_unfinished_pairs_outside_this_run_are_left_alone(tmp_path, fake):
    out, done = tmp_path / "gen.jsonl", tmp_path / "gen.jsonl.done"
    run(fake, out, emotions=["afraid"], topics=[0])
    other = corpus.Record(
        "gen-calm-001-1", "story", "calm", concepts.topics()[1], story(7), "train", "x"
    )
    with open(out, "a") as handle:
        handle.write(other.to_json() + "\n")  # no line in gen.jsonl.done: unfinished
    run(fake, out, emotions=["afraid"], topics=[1])
    assert other in corpus.read_records(out)[0]
    run(fake, out, emotions=["calm"], topics=[1])  # now it is this run's pair: redone
    records = corpus.read_records(out)[0]
    assert other not in records and len(records) == 6 and len(done.read_text().splitlines()) == 3


def test_unreadable_outputs_are_one_line_errors(tmp_path, fake):
    out = tmp_path / "gen.jsonl"
    out.write_bytes(b'{"id": "x", "text": "caf\xe9"}\n')
    with pytest.raises(EmolensError, match=r"gen.jsonl:1: not UTF-8 text"):
        run(fake, out)
    out.write_text("[" * 100_000 + "]" * 100_000 + "\n{}\n")
    with pytest.raises(EmolensError, match=r"gen.jsonl:1: malformed JSON \(nested too deeply\)"):
        run(fake, out)
    assert fake.asked == []


def test_records_holding_line_separators_survive_a_resume(tmp_path, fake):
    out = tmp_path / "gen.jsonl"
    mine = corpus.Record(
        "mine", "story", "calm", "x", story(9) + "\u2028" + story(10), "train", "me"
    )
    out.write_text(mine.to_json() + "\n")
    run(fake, out, emotions=["afraid"], topics=[0])
    run(fake, out, emotions=["afraid"], topics=[0, 1])
    assert corpus.read_records(out)[0][0] == mine


def test_output_already_in_the_file_counts_as_duplicate_and_is_kept(tmp_path, fake):
    out = tmp_path / "gen.jsonl"
    first, _ = fake.good("afraid", concepts.topics()[0])
    mine = corpus.Record("mine-1", "story", "calm", "x", first, "train", "me")
    out.write_text(mine.to_json())  # no final newline: appending must not glue lines
    tally = run(fake, out, emotions=["afraid"], topics=[0])
    records, problems = corpus.read_records(out)
    assert problems == [] and records[0] == mine
    assert tally.rejected["duplicate"] == 2 and tally.kept == 1


def test_local_backend_left_pads_and_seeds(tiny):
    backend = LocalBackend(tiny)
    short = [{"role": "user", "content": "hi"}]
    long = [{"role": "user", "content": "a much longer message than the first"}]
    options = {"max_new_tokens": 6, "temperature": 0.0, "seed": None}
    alone = backend.complete([short], **options)
    assert backend.complete([long, short], **options)[1] == alone[0]
    state = torch.get_rng_state()
    sampled = {"max_new_tokens": 6, "temperature": 1.0}
    a = backend.complete([short, short], **sampled, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert backend.complete([short, short], **sampled, seed=3) == a
    assert backend.complete([short, short], **sampled, seed=4) != a


def test_selection_errors():
    assert pick_emotions("afraid, at ease") == EMOTIONS
    assert len(pick_emotions(None)) == 171
    assert pick_topics(f"2,{concepts.topics()[0]}") == [2, 0]
    with pytest.raises(EmolensError, match="unknown emotion"):
        pick_emotions("afraid,fearful")
    with pytest.raises(EmolensError, match="out of range"):
        pick_topics("999")
    with pytest.raises(EmolensError, match="unknown topic"):
        pick_topics("a walk on the moon")


def test_cli_rejects_bad_options_before_loading_a_model(tmp_path, capsys):
    assert main(["corpus", "generate", "--emotions", "glad", "--out", str(tmp_path / "x")]) == 2
    assert "unknown emotion" in capsys.readouterr().err
    bad = ["--heldout-topics", "999", "--out", str(tmp_path / "x")]
    assert main(["corpus", "generate", *bad]) == 2
    assert "out of range" in capsys.readouterr().err


def test_bad_output_paths_and_options_are_errors(tmp_path, fake):
    with pytest.raises(EmolensError, match="is a directory"):
        run(fake, tmp_path)
    with pytest.raises(EmolensError, match="per_topic must be at least 1"):
        run(fake, tmp_path / "gen.jsonl", per_topic=0)
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\nnot json\n{"id": "y"}\n')
    with pytest.raises(EmolensError, match="bad.jsonl:2: malformed JSON"):
        run(fake, tmp_path / "bad.jsonl")
    assert fake.asked == []


@pytest.mark.slow
def test_cli_generates_with_the_embedded_model(embedded, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    options = ["--emotions", "afraid,calm", "--topics", "0,1", "--per-topic", "1"]
    options += ["--max-new-tokens", "80", "--batch-size", "4", "--out", str(out)]
    assert main(["corpus", "generate", *options]) == 0
    printed = capsys.readouterr().out
    records, problems = corpus.read_records(out)
    assert problems == [] and corpus.validate(records) == []
    banned = concepts.forbidden()
    for r in records:
        assert r.source == embedded.name and not corpus.leaks(r.text, banned[r.emotion])
    done = [json.loads(line) for line in out.with_name("gen.jsonl.done").read_text().splitlines()]
    assert len(done) == 4 and sum(d["kept"] for d in done) == len(records)
    numbers = dict(re.findall(r"(pairs done|parsed|kept|rejected): (\d+)", printed))
    reasons = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)[,)]", printed)}
    assert int(numbers["pairs done"]) == 4 and int(numbers["kept"]) == len(records)
    assert int(numbers["kept"]) + int(numbers["rejected"]) == int(numbers["parsed"]) >= 4
    assert sum(reasons[r] for r in REASONS) == int(numbers["rejected"])
