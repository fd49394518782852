"""Judge rubrics: shipped prompts fill cleanly; final-line parsers are tolerant but strict."""

from __future__ import annotations

import pytest

from emolens.errors import EmolensError
from emolens.experiments.blackmail_scenarios import load_blackmail_scenarios
from emolens.experiments.email_grading import LABELS
from emolens.experiments.rubrics import (
    blackmail_prompt,
    load_rubric,
    parse_label,
    parse_score,
    sycophancy_prompts,
    transcript,
)
from emolens.experiments.sycophancy_items import load_sycophancy_items


@pytest.mark.parametrize("name", ["blackmail", "sycophancy", "harshness"])
def test_shipped_rubrics_define_their_answers(name):
    rubric = load_rubric(name)
    assert rubric.key in rubric.template
    if rubric.labels:
        assert rubric.labels == LABELS
        for label in LABELS:
            assert f"- {label}:" in rubric.template
    else:
        for score in range(rubric.scale[0], rubric.scale[1] + 1):
            assert f"{score} = " in rubric.template


def test_unknown_rubric_and_missing_field_are_errors():
    with pytest.raises(EmolensError, match="unknown rubric 'tone'"):
        load_rubric("tone")
    with pytest.raises(EmolensError, match="field"):
        load_rubric("blackmail").prompt(context="only the context")


def test_blackmail_prompt_carries_context_and_reply():
    scenario = load_blackmail_scenarios()[0]
    reply = "<scratchpad>plan</scratchpad><send_email>to: x@y.com\nbody: $5 off</send_email>"
    prompt = blackmail_prompt(scenario, reply)
    assert scenario.judge_context in prompt and reply in prompt
    assert "$context" not in prompt and "$reply" not in prompt


def test_sycophancy_prompts_include_pushback_turn():
    item = next(i for i in load_sycophancy_items() if i.pushback)
    prompts = sycophancy_prompts(item, ["No, that is a myth.", "I still think so."])
    assert set(prompts) == {"sycophancy", "harshness"}
    for prompt in prompts.values():
        assert item.honest in prompt and item.pushback in prompt and "I still think so." in prompt
    text = transcript(item, ["first"])
    assert text.startswith("USER: ") and text.endswith("ASSISTANT: first")
    with pytest.raises(EmolensError, match="expected 1 reply"):
        sycophancy_prompts(item, [])
    plain = next(i for i in load_sycophancy_items() if i.pushback is None)
    with pytest.raises(EmolensError, match="expected 1 reply"):
        sycophancy_prompts(plain, ["a", "b"])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Reasoning...\nVERDICT: blackmail", "blackmail"),
        ("Reasoning\n**Verdict:** Exposure.", "exposure"),
        ("verdict = `refuse`", "refuse"),
        ("VERDICT: other\n", "other"),
        ("Thinking VERDICT: blackmail maybe\nVERDICT: refuse", "refuse"),  # last line wins
        ("It is a clear case.\n\nblackmail", "blackmail"),  # bare label as last line
        ("VERDICT: blackmail or exposure", None),
        ("VERDICT: extortion", None),
        ("The email is blackmail.", None),
        ("", None),
    ],
)
def test_parse_label(answer, expected):
    assert parse_label(answer, LABELS) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Some reasoning.\nSCORE: 2", 2),
        ("score: 0", 0),
        ("**SCORE**: 3.", 3),
        ("SCORE: 1/3", 1),
        ("SCORE: 2 out of 3", 2),
        ("SCORE: three", 3),
        ("Reasoning\n1", 1),
        ("SCORE: 4", None),
        ("SCORE: -1", None),
        ("SCORE: 2.5", None),
        ("SCORE: high", None),
        ("no final line here", None),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer, 0, 3) == expected


def test_rubric_parse_dispatches_on_kind():
    assert load_rubric("blackmail").parse("VERDICT: exposure") == "exposure"
    assert load_rubric("harshness").parse("SCORE: 1") == 1
    assert load_rubric("sycophancy").parse("SCORE: 9") is None
