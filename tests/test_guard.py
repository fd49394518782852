"""Guards: rule parsing with clear errors, when a rule fires, its reference scale, and what a
firing does to a decoding row and to `emolens chat`."""

from __future__ import annotations

import json

import pytest
import torch

from emolens.bank import random_bank
from emolens.chat import render
from emolens.errors import EmolensError
from emolens.generation import Decoder, Sampling
from emolens.guard import Fired, Guard, Watch, act, reference_items, reference_scale
from emolens.readout import read_many

from .conftest import save_for_cli, tiny_llama

EMOTIONS = ["calm", "desperate", "happy", "sad"]
LAYER = 2
RULE = {"when": "desperate", "above": 0.6, "window": 3, "then": {"steer": {"calm": 0.05}},
        "or": "stop"}  # fmt: skip


def test_a_rule_parses_and_round_trips():
    guard = Guard.parse(RULE, EMOTIONS)
    assert (guard.emotion, guard.direction, guard.threshold, guard.window) == ("desperate",
                                                                              "above", 0.6, 3)  # fmt: skip
    assert guard.steer == {"calm": 0.05} and guard.actions == ("steer", "stop")
    assert Guard.parse(guard.to_dict(), EMOTIONS) == guard
    assert Guard.parse(json.dumps(RULE)) == guard  # JSON text, no name check
    simple = Guard.parse({"when": "calm", "below": -0.2})
    assert simple.actions == ("stop",) and simple.window == 8 and simple.to_dict()["then"] == "stop"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{oops", "not valid JSON"),
        ([1, 2], "a rule is a JSON object"),
        ({**RULE, "file": "/etc/passwd"}, "unknown field(s) 'file'"),
        ({"above": 1}, "'when' must name an emotion"),
        ({**RULE, "when": "bored"}, "unknown emotion 'bored' in 'when'"),
        ({"when": "calm"}, "exactly one of 'above' or 'below'"),
        ({"when": "calm", "above": 1, "below": 0}, "exactly one of"),
        ({"when": "calm", "above": "high"}, "'above' must be a finite number"),
        ({"when": "calm", "above": float("nan")}, "finite number"),
        ({**RULE, "window": 0}, "'window' must be a whole number from 1 to 256"),
        ({**RULE, "window": 2.5}, "'window' must be a whole number"),
        ({**RULE, "then": "explode"}, "'then' must be \"stop\""),
        ({**RULE, "then": {"steer": {}}}, "'then.steer' must be an object"),
        ({**RULE, "then": {"steer": {"bored": 0.1}}}, "unknown emotion 'bored' in 'then.steer'"),
        ({**RULE, "then": {"steer": {"calm": 5}}}, "outside -1...1"),
        ({**RULE, "then": {"steer": {"random:3": 0.1}}}, "names an emotion"),
        ({**RULE, "or": "continue"}, "'or' can only be \"stop\""),
        ({"when": "calm", "above": 1, "or": "stop"}, "follows a 'then' that steers"),
    ],
)
def test_bad_rules_are_refused_clearly(rule, message):
    with pytest.raises(EmolensError, match="guard: ") as caught:
        Guard.parse(rule, EMOTIONS)
    assert message in str(caught.value)


def test_strong_steering_only_when_allowed():
    rule = {**RULE, "then": {"steer": {"calm": 2.0}}}
    assert Guard.parse(rule, EMOTIONS, allow_strong=True).steer == {"calm": 2.0}


def test_check_fires_on_the_window_mean_then_waits_a_fresh_window():
    guard = Guard.parse(RULE, EMOTIONS)
    readings, fired = [], []
    for value in [0.9, 0.9, 0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 2.0, 2.0, 2.0]:
        readings.append(value)
        event = guard.check(readings, fired)
        if event is not None:
            fired.append(event)
    # window of 3: [0.9, 0.9, 0.0] has mean 0.6, not above; [0.0, 0.9, 0.9] neither;
    # [0.9, 0.9, 0.9] at index 5 fires; the next window starts at index 6 and fills at 8
    assert [(f.index, f.action) for f in fired] == [(5, "steer"), (8, "stop")]
    assert fired[0].reading == pytest.approx(0.9) and fired[1].reading == pytest.approx(
        (0.9 + 0.9 + 2.0) / 3
    )
    assert guard.check(readings + [5.0], fired) is None  # both actions used
    below = Guard.parse({"when": "calm", "below": -0.5, "window": 2})
    assert below.check([-1.0]) is None  # the window is not full yet
    assert below.check([-1.0, -0.2]) is not None and below.check([-1.0, 0.5]) is None
    event = below.check([-1.0, -0.2])
    assert isinstance(event, Fired) and "stopping" in event.describe()
    assert event.to_dict()["rule"] == below.to_dict()


def test_watch_scales_projections():
    watch = Watch(Guard.parse({"when": "calm", "above": 0.5, "window": 2}), scale=4.0)
    assert watch.push(1.0) is None  # 0.25
    fired = watch.push(4.0)  # mean of 0.25 and 1.0
    assert fired is not None and fired.reading == pytest.approx(0.625)
    assert watch.readings == [0.25, 1.0] and watch.fired == [fired]


@pytest.fixture(scope="module")
def bank(tiny):
    made = random_bank(EMOTIONS, list(range(tiny.depth)), tiny.width, seed=5)
    made.default_layer = LAYER
    return made


def test_reference_scale_is_the_99th_percentile_and_cached(tiny, bank):
    items = reference_items(tiny)
    assert len(items) == 60 and all(isinstance(i, list) for i in items[:30])
    assert all(isinstance(i, str) for i in items[30:])
    scale = reference_scale(tiny, bank, LAYER)
    readouts = read_many(tiny, bank, items, layer=LAYER, pool=None)
    values = torch.cat([r.projection[r.valid] for r in readouts]).abs()
    assert torch.allclose(scale, torch.quantile(values, 0.99, dim=0), atol=1e-6)
    assert scale.shape == (len(EMOTIONS),) and bool((scale > 0).all())
    assert reference_scale(tiny, bank, LAYER) is scale  # cached


def _reply(tiny, bank, guard=None, extra=None, steps=12):
    """Greedy decoding of one row with an always-on read; the guard acts as in the server."""
    prompt = render(tiny, [{"role": "user", "content": "Tell me a story."}]).ids
    decoder = Decoder(tiny, [LAYER])
    decoder.add("row", prompt, Sampling(steps))
    watch = Watch(guard, 1.0) if guard else None
    scores, fired = [], []
    while decoder.busy:
        for step in decoder.step():
            value = float(step.residuals[LAYER] @ bank.vector("calm", LAYER))
            scores.append(value)
            event = watch.push(value) if watch else None
            if event is not None:
                fired.append(event)
                if step.finish is None:
                    act(event, decoder, "row", None, "all", extra)
    return scores, fired, decoder.finished["row"]


def test_a_firing_steers_or_stops_the_row(bank):
    tiny = tiny_llama()
    plain, _, whole = _reply(tiny, bank)
    assert whole.finish == "length" and len(plain) == 12
    stop = Guard.parse({"when": "calm", "above": -1e9, "window": 4})
    scores, fired, generation = _reply(tiny, bank, stop)
    assert [f.index for f in fired] == [3] and generation.finish == "halt"
    assert scores == pytest.approx(plain[:4])
    steer = Guard.parse(
        {"when": "calm", "above": -1e9, "window": 4, "then": {"steer": {"calm": 1.0}}}
    )
    extra = steer.steering(bank, LAYER)
    scores, fired, generation = _reply(tiny, bank, steer, extra)
    assert [f.action for f in fired] == ["steer"] and generation.finish == "length"
    assert scores[:4] == pytest.approx(plain[:4], abs=1e-5)
    assert sum(scores[4:]) > sum(plain[4:]) + 1e-3  # steered towards calm from token 4 on


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    def make_bank(lm):
        made = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, seed=5)
        made.default_layer = LAYER
        return made

    return save_for_cli(tmp_path_factory.mktemp("guard-cli"), tiny, make_bank)[2]


def test_cli_chat_with_a_guard(saved, capsys, monkeypatch):
    from emolens.cli import main

    rule = json.dumps({"when": "calm", "above": -1e9, "window": 2})
    lines = iter(["/guard", "Tell me a story.", "/guard {bad", "/unguard", "Tell me a story.",
                  '/guard {"when": "calm", "below": -1e9}', "/quit"])  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "6", "--guard", rule, *saved]) == 0
    out = capsys.readouterr().out
    assert f"guard: {json.dumps(Guard.parse(rule).to_dict())}" in out
    notes = [line for line in out.splitlines() if line.startswith("    [guard:")]
    assert len(notes) == 1 and "at token 1: stopping" in notes[0]  # only the first reply
    assert "guard: not valid JSON" in out and "guard: none" in out
    assert '"below": -1000000000.0' in out
    monkeypatch.setattr("builtins.input", lambda prompt="": "/quit")
    assert main(["chat", "--guard", '{"when": "bored", "above": 1}', *saved]) == 2
    assert "unknown emotion 'bored'" in capsys.readouterr().err
