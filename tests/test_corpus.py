import json
from collections import Counter, defaultdict

import pytest

from emolens import concepts, corpus
from emolens.cli import main
from emolens.errors import EmolensError


@pytest.fixture(scope="module")
def shipped():
    return corpus.check()


def test_concepts_are_complete():
    emotions = concepts.emotions()
    assert len(emotions) == 171 and len(set(emotions)) == 171
    assert {"at ease", "grief-stricken", "hope", "hopeful", "worn out"} <= set(emotions)
    assert len(concepts.showcase()) == 12 and set(concepts.showcase()) <= set(emotions)
    forbidden = concepts.forbidden()
    assert all(e in forbidden[e] for e in emotions)
    assert len(concepts.topics()) >= 100 and len(set(concepts.topics())) == len(concepts.topics())
    ratings = concepts.ratings()
    assert set(ratings) == set(emotions)
    assert all(1 <= v <= 7 and 1 <= a <= 7 for v, a in ratings.values())
    assert (
        ratings["happy"][0] > 5 > ratings["sad"][0]
        and ratings["terrified"][1] > ratings["sleepy"][1]
    )


def test_shipped_corpus_has_no_problems(shipped):
    records, problems = shipped
    assert problems == []


def test_shipped_corpus_counts_and_splits(shipped):
    records, _ = shipped
    train, held = defaultdict(list), defaultdict(list)
    for r in records:
        if r.kind == "story":
            (train if r.split == "train" else held)[r.emotion].append(r.topic)
    for emotion in concepts.emotions():
        assert len(train[emotion]) >= 12 and len(set(train[emotion])) >= 12, emotion
        assert len(held[emotion]) >= 3, emotion
        assert not set(held[emotion]) & set(train[emotion]), emotion
    assert sum(r.kind == "neutral" for r in records) >= 300
    assert {r.source for r in records} == {"emolens-authors"}


def test_shipped_scenarios_and_templates():
    per = Counter(s["emotion"] for s in corpus.scenarios())
    assert all(per[e] >= 3 for e in concepts.showcase())
    rows = corpus.templates()
    assert len(rows) >= 6
    assert all(len(t["values"]) >= 4 and t["expect"] for t in rows)


BROKEN = [
    '{"id": "a", "kind": "story", "emotion": "happy", "topic": "t", "split": "train", "source": "x"}',
    "{not json",
    json.dumps(dict(id="b", kind="story", emotion="jolly", topic="t", text="word " * 60, split="train", source="x")),
    json.dumps(dict(id="c", kind="story", emotion="sad", topic="t", text="too short", split="train", source="x")),
    json.dumps(dict(id="d", kind="story", emotion="happy", topic="t", text="She was so happy today. " + "ok " * 60, split="train", source="x")),
    json.dumps(dict(id="e", kind="story", emotion="calm", topic="u", text=" ".join(f"w{i}" for i in range(80)), split="train", source="x")),
    json.dumps(dict(id="f", kind="story", emotion="calm", topic="v", text=" ".join(f"w{i}" for i in range(80)), split="heldout", source="x")),
    json.dumps(dict(id="g", kind="neutral", emotion="", topic="code", text="Human: Is it safe to run?\n\nAssistant: Yes it runs. " + "x " * 30, split="train", source="x")),
]  # fmt: skip


def test_broken_corpus_reports_each_problem_with_its_line(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(BROKEN) + "\n")
    _, problems = corpus.check(path)
    found = {(p.line, p.rule) for p in problems}
    assert (1, "missing field") in found
    assert (2, "malformed JSON") in found
    assert (3, "unknown emotion") in found
    assert (4, "length") in found
    assert (5, "leak") in found
    assert (7, "near-duplicate") in found
    assert (8, "leak") in found  # "safe" is a forbidden word: neutral dialogues may use none
    assert all(p.file == str(path) for p in problems)
    assert main(["corpus", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: malformed JSON" in out and f"{path}:5: leak: forbidden word(s) happy" in out
    with pytest.raises(EmolensError, match="problem"):
        corpus.load(path)


def test_split_leak_is_reported(tmp_path):
    text = "one two three four five six seven eight nine ten " * 6
    rows = [
        dict(id="a", kind="story", emotion="calm", topic="t", text=text, split="train", source="x"),
        dict(
            id="b",
            kind="story",
            emotion="calm",
            topic="t",
            text=text[::-1],
            split="heldout",
            source="x",
        ),
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ("split leak", 2) in {(p.rule, p.line) for p in corpus.check(path)[1]}


def test_dialogue_parsing():
    text = "System: Be brief.\n\nHuman: Show code.\n\nAssistant: Here:\n\nx = 1\n\nHuman: And?"
    roles = [m["role"] for m in corpus.dialogue_messages(text)]
    assert roles == ["system", "user", "assistant", "user"]
    assert corpus.dialogue_messages(text)[2]["content"] == "Here:\n\nx = 1"


def test_ratings_loader_names_file_line_and_field(tmp_path):
    path = tmp_path / "norms.csv"
    path.write_text("word,valence,arousal\nhappy,8.1,6.0\nsad,low,3\n")
    with pytest.raises(EmolensError, match=r"norms.csv:3: field 'valence' is not a number"):
        concepts.ratings(path)
    path.write_text("term,v,a\nhappy,1,2\n")
    with pytest.raises(EmolensError, match="norms.csv:1: header"):
        concepts.ratings(path)
