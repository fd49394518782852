import json
import random
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
    with pytest.raises(EmolensError, match=r"norms.csv:3: field 'valence' is not a finite number"):
        concepts.ratings(path)
    path.write_text("term,v,a\nhappy,1,2\n")
    with pytest.raises(EmolensError, match="norms.csv:1: header"):
        concepts.ratings(path)
    path.write_text("word,valence,arousal\nhappy,nan,2\n")
    with pytest.raises(EmolensError, match="norms.csv:2: field 'valence' is not a finite number"):
        concepts.ratings(path)
    path.write_text("word,valence,arousal\n,3,2\n")
    with pytest.raises(EmolensError, match="norms.csv:2: field 'word' is empty"):
        concepts.ratings(path)


def test_leaks_match_whole_word_sequences_in_banned_order():
    banned = ["calm", "at ease", "relaxed"]
    assert corpus.leaks("He sat, AT   ease; then relaxed.", banned) == ["at ease", "relaxed"]
    assert corpus.leaks("the flat ease of calmness", banned) == []


SYLLABLES = [a + b for a in "bdfgklmnprst" for b in "aeiou"]


def prose(rng: random.Random, count: int, vocab: int = 60) -> list[str]:
    return [rng.choice(SYLLABLES[:vocab]) for _ in range(count)]


def noisy_texts(seed: int, count: int) -> list[str]:
    """Texts over a small vocabulary, most of them edited copies of earlier ones."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        if texts and rng.random() < 0.7:
            tokens = rng.choice(texts).split()
            for _ in range(rng.randint(0, 12)):
                at = rng.randrange(len(tokens) + 1)
                edit = rng.choice(("replace", "insert", "delete", "cut"))
                if edit == "insert" or at == len(tokens):
                    tokens[at:at] = prose(rng, rng.randint(1, 6), 8)
                elif edit == "replace":
                    tokens[at] = rng.choice(SYLLABLES)
                elif edit == "delete" and len(tokens) > 1:
                    del tokens[at]
                elif edit == "cut" and len(tokens) > 8:
                    tokens = tokens[: len(tokens) // 2] if at % 2 else tokens[len(tokens) // 2 :]
        else:
            tokens = prose(rng, rng.randint(3, 60), rng.choice((8, 60)))
        texts.append(" ".join(tokens))
    return texts


@pytest.mark.parametrize("seed", range(4))
def test_near_duplicate_groups_agree_with_brute_force(seed):
    texts = noisy_texts(seed, 300)
    grams = [corpus.shingles(t) for t in texts]
    groups = corpus.near_duplicate_groups(texts)
    grouped = {i for copies in groups.values() for i, _ in copies}
    kept = [i for i in range(len(texts)) if i not in grouped]
    assert grouped and not grouped & groups.keys() and set(groups) <= set(kept)
    for first, copies in groups.items():
        for i, score in copies:
            assert first < i and score == corpus.jaccard(grams[first], grams[i]) >= 0.3
    for position, i in enumerate(kept):  # what is left has no near-duplicates at all
        assert all(corpus.jaccard(grams[i], grams[j]) < 0.3 for j in kept[:position] if grams[i])
    for i in grouped:  # and each copy was matched to the closest earlier kept text
        ((first, score),) = [(f, s) for f, c in groups.items() for j, s in c if j == i]
        assert score == max(corpus.jaccard(grams[i], grams[j]) for j in kept if j < i)


def record(id_: str, text: str, **fields) -> str:
    row = dict(id=id_, kind="story", emotion="calm", topic="t", text=text, split="train")
    return json.dumps(row | {"source": "x"} | fields)


def test_identical_lines_make_one_near_duplicate_problem(tmp_path, capsys):
    text = " ".join(prose(random.Random(0), 80))
    path = tmp_path / "same.jsonl"
    path.write_text((record("r", text) + "\n") * 300)
    _, problems = corpus.check(path)
    near = [p for p in problems if p.rule == "near-duplicate"]
    assert len(near) == 1 and near[0].line == 2 and len(problems) == 1 + 299  # + duplicate ids
    assert "of r (" in near[0].message and "(and 298 other" in near[0].message
    assert "line(s) 3, 4, 5, 6, 7, ..." in near[0].message
    assert main(["corpus", "check", str(path), "--max-problems", "10"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(f"{path}:") for line in out) == 10
    assert f"... and {len(problems) - 10} more problem(s)" in out[-3]


def test_near_duplicates_across_files_name_their_file(tmp_path):
    text = " ".join(prose(random.Random(0), 80))
    for name, ids in (("a.jsonl", "abc"), ("b.jsonl", "de")):
        (tmp_path / name).write_text("".join(record(i, text) + "\n" for i in ids))
    (problem,) = [p for p in corpus.check(tmp_path)[1] if p.rule == "near-duplicate"]
    assert (problem.file, problem.line) == (str(tmp_path / "a.jsonl"), 2)
    assert problem.message.endswith(
        f"line(s) 3, {tmp_path / 'b.jsonl'}:1, {tmp_path / 'b.jsonl'}:2)"
    )


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_corpus_is_an_error(tmp_path, capsys, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(EmolensError, match="empty.jsonl: the corpus has no records"):
        corpus.check(path)
    assert main(["corpus", "check", str(path)]) == 2
    assert "no records" in capsys.readouterr().err


def test_stories_without_neutral_dialogues_get_a_warning(tmp_path, capsys):
    path = tmp_path / "stories.jsonl"
    path.write_text(record("a", " ".join(prose(random.Random(0), 80))) + "\n")
    assert main(["corpus", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: no neutral dialogues (denoising needs them)" in out
    assert out.rstrip().endswith("1 records, 0 problem(s)")
    assert corpus.build_warnings(corpus.load().records) == []


def test_unreadable_corpus_files_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        record("a", "ok " * 60).encode()
        + b"\n"
        + record("b", "cafe").replace("cafe", "caf\xe9").encode("latin-1")
    )
    with pytest.raises(EmolensError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xe9 at offset"):
        corpus.check(path)
    (tmp_path / "dir" / "x.jsonl").mkdir(parents=True)
    for bad, message in (("dir", "no .jsonl files"), ("gone.jsonl", "no such corpus file")):
        with pytest.raises(EmolensError, match=message):
            corpus.check(tmp_path / bad)
    assert main(["corpus", "check", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n" + record("a", "ok " * 60) + "\n")
    records, problems = corpus.check(path)
    assert [r.id for r in records] == ["a"]
    assert (1, "malformed JSON", "nested too deeply") in {
        (p.line, p.rule, p.message) for p in problems
    }


def test_ratings_loader_rejects_non_utf8_and_reads_a_byte_order_mark(tmp_path):
    path = tmp_path / "norms.csv"
    path.write_bytes("word,valence,arousal\nhappy,8,6\nna\xefve,4,3\n".encode("latin-1"))
    with pytest.raises(EmolensError, match=r"norms.csv:3: not UTF-8 text"):
        concepts.ratings(path)
    path.write_bytes("word,valence,arousal\nhappy,8,6\n".encode("utf-8-sig"))
    assert concepts.ratings(path) == {"happy": (8.0, 6.0)}


def test_shipped_cross_genre_texts(shipped):
    records, _ = shipped
    genres = [r for r in records if r.kind in corpus.GENRES]
    validation = Counter((r.emotion, r.kind) for r in genres if r.split == "validation")
    train = Counter((r.emotion, r.kind) for r in genres if r.split == "train")
    emotions = {e for e, _ in validation}
    assert len(emotions) >= 36 and set(concepts.showcase()) <= emotions
    assert all(validation[(e, g)] >= 10 for e in emotions for g in corpus.GENRES)
    assert all(train[(e, g)] >= 2 for e in concepts.emotions() for g in corpus.GENRES)
    assert all(bool(r.context) == (r.kind == "dialogue") for r in genres)
    texts = {r.text for r in genres if r.split == "validation"}
    assert not texts & {r.text for r in genres if r.split == "train"}
    loaded = corpus.load()
    assert len(loaded.genres("validation")) == len([r for r in genres if r.split == "validation"])
    assert not {r.id for r in loaded.stories()} & {r.id for r in loaded.genres()}


def test_cross_genre_records_are_checked(tmp_path):
    rows = [
        dict(id="a", kind="comment", emotion="calm", topic="", text="i feel so calm right now ok", split="validation", source="x"),
        dict(id="b", kind="dialogue", emotion="happy", topic="", text="We did it, we really did it!", split="validation", source="x"),
        dict(id="c", kind="diary", emotion="sad", topic="", text="short", split="heldout", source="x", context="Nope."),
    ]  # fmt: skip
    path = tmp_path / "genres.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, problems = corpus.check(path)
    rules = {(p.line, p.rule) for p in problems}
    assert (1, "leak") in rules and (2, "context") in rules
    assert {(3, "unknown split"), (3, "context"), (3, "length")} <= rules
