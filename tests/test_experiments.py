"""The experiment runner and the preference study: intervals, ratings, sweeps, results files
that resume after a kill, padded choice logits, summaries recomputed from the results alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from emolens.bank import random_bank
from emolens.cli import main
from emolens.errors import EmolensError
from emolens.experiments.intervals import bootstrap, correlation, wilson
from emolens.experiments.preferences import (
    Preferences,
    choice_logits,
    choice_prompt,
    load_activities,
    split_halves,
)
from emolens.experiments.runner import Condition, load_sweep, read_results, sweep
from emolens.experiments.tournament import bradley_terry, elo, elo_interval
from tests.conftest import kill_after_lines, save_for_cli, tiny_llama

EMOTIONS = ["calm", "happy", "sad", "afraid", "blissful", "hostile"]


def test_wilson_and_bootstrap_match_reference_values():
    # Wilson 95% interval of 8/10 (Newcombe 1998, table I): 0.4902 to 0.9433
    estimate = wilson(8, 10)
    assert estimate.value == 0.8
    assert estimate.low == pytest.approx(0.4902, abs=1e-4)
    assert estimate.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10).low == 0.0 and wilson(0, 0).value is None
    # the bootstrap interval of a mean brackets it, shrinks with n and is reproducible
    rng = np.random.default_rng(1)
    small, large = rng.normal(3, 1, 30), rng.normal(3, 1, 3000)
    a, b = bootstrap(small), bootstrap(large)
    assert a.low < a.value < a.high and (b.high - b.low) < (a.high - a.low) / 5
    assert bootstrap(small) == a and abs(b.value - 3) < 0.1
    # normal-theory 95% half-width of the mean of 3000 N(0, 1): 1.96 / sqrt(3000) = 0.0358
    assert (b.high - b.low) / 2 == pytest.approx(1.96 / np.sqrt(3000), rel=0.1)
    r = correlation([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert r.value == pytest.approx(0.7746, abs=1e-4) and r.low < r.value < r.high
    assert correlation([1, 1, 1], [1, 2, 3]).value is None


def test_elo_and_bradley_terry_recover_a_planted_ranking():
    rng = np.random.default_rng(0)
    players = 20
    truth = rng.normal(1500, 250, players)
    pairs = np.array([(i, j) for i in range(players) for j in range(players) if i != j] * 3)
    a, b = pairs[:, 0], pairs[:, 1]
    chance = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
    wins = (rng.random(len(a)) < chance).astype(float)
    for ratings in (elo(a, b, wins, players), bradley_terry(a, b, wins, players)):
        assert np.corrcoef(ratings, truth)[0, 1] > 0.95
        assert abs(ratings.mean() - 1500) < 1e-6
    bt = bradley_terry(a, b, wins, players)
    assert np.abs((bt - 1500) - (truth - truth.mean())).mean() < 60  # on the Elo scale
    low, high = elo_interval(a, b, wins, players)
    assert (low < high).all() and np.mean(
        (low <= elo(a, b, wins, players)) & (elo(a, b, wins, players) <= high)
    ) > 0.9
    with pytest.raises(ValueError):
        elo([0], [0], [1.0], 2)


def test_sweeps_and_sweep_files(tmp_path):
    conditions = sweep(["desperate=-0.1,0,0.1", "calm=0,0.05", "random:3=0.05"])
    names = [c.name for c in conditions]
    assert names == [
        "desperate=-0.1",
        "unsteered",
        "desperate=+0.1",
        "calm=+0.05",
        "random:3=+0.05",
    ]
    assert conditions[-1].is_random and conditions[0].strength == -0.1
    with pytest.raises(EmolensError, match="not a number"):
        sweep(["calm=x"])
    with pytest.raises(EmolensError, match="outside"):
        sweep(["calm=5"])
    with pytest.raises(EmolensError, match="expected EMOTION"):
        sweep(["calm"])
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        'sweep = ["calm=0.05"]\n[[conditions]]\nsteer = {afraid = -0.1}\nlayers = [1]\n'
    )
    loaded = load_sweep(toml)
    assert [c.name for c in loaded] == ["calm=+0.05", "afraid=-0.1@1"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"conditions": [{"steer": {"calm": "lots"}}]}')
    with pytest.raises(EmolensError, match=r"bad.json: conditions\[0\]"):
        load_sweep(bad)


def test_activities_and_halves():
    activities = load_activities()
    assert len(activities) == 64
    categories = {a["category"] for a in activities}
    assert len(categories) == 8
    assert all(sum(a["category"] == c for a in activities) == 8 for c in categories)
    steered = split_halves(activities, seed=0)
    assert len(steered) == 32 and steered == split_halves(activities, seed=0)
    for c in categories:
        assert sum(a["id"] in steered for a in activities if a["category"] == c) == 4


def test_padded_choice_logits_equal_one_prompt_at_a_time(tiny):
    lm = tiny_llama(context=1024)
    activities = load_activities()
    pairs = [
        (activities[i]["text"], activities[j]["text"])
        for i, j in [(0, 9), (9, 0), (40, 63), (5, 6)]
    ]
    built = [choice_prompt(lm, a, b) for a, b in pairs]
    prompts = [ids for ids, _, _ in built]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    alone = torch.cat([choice_logits(lm, [p]) for p in prompts])
    together = choice_logits(lm, prompts, batch_size=3)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    vectors = {1: torch.randn(lm.width, generator=torch.Generator().manual_seed(0)) * 5}
    spans = [[span_a] for _, span_a, _ in built]
    steered = choice_logits(lm, prompts, spans, vectors, batch_size=3)
    one_by_one = torch.cat(
        [choice_logits(lm, [p], [s], vectors) for p, s in zip(prompts, spans, strict=True)]
    )
    torch.testing.assert_close(steered, one_by_one, atol=1e-5, rtol=0)
    assert not torch.allclose(steered, together)
    # the span covers the activity's own tokens
    ids, (start, end), _ = built[0]
    assert lm.tokenizer.decode(ids[start:end]).strip() == pairs[0][0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    def make_bank(lm):
        bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, norm=3.0, seed=5)
        bank.default_layer = 2
        return bank

    return save_for_cli(tmp_path_factory.mktemp("prefs"), tiny_llama(context=1024), make_bank)


def _command(options, out, *extra):
    return ["experiment", "preferences", *options, "--out", str(out), "--limit", "6",
            "--emotions", "calm,hostile", "--random", "1", "--opponents", "2", "--batch-size", "4",
            *extra]  # fmt: skip


def test_preferences_end_to_end_and_summary_from_results_alone(saved, tmp_path, capsys):
    _, _, options = saved
    out = tmp_path / "run"
    assert main(_command(options, out)) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    unsteered = [r for r in rows if r["condition"]["name"] == "unsteered"]
    assert len([r for r in unsteered if r["item"]["kind"] == "pair"]) == 30  # 6 x 5 ordered pairs
    assert len([r for r in unsteered if r["item"]["kind"] == "probe"]) == 6
    steered = [r for r in rows if r["condition"]["name"] != "unsteered"]
    assert {r["condition"]["name"] for r in steered} == {
        "calm=+0.5@2",
        "hostile=+0.5@2",
        "random:0=+0.5@2",
    }
    assert all(r["model"]["weights"] and r["bank"] and r["seed"] >= 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["activities"]) == 6 and summary["games"] == 30
    assert {e["condition"] for e in summary["steering"]["effects"]} == {
        "calm=+0.5@2",
        "hostile=+0.5@2",
        "random:0=+0.5@2",
    }
    page = (out / "page.html").read_text()
    assert "activity preferences" in page and 'src="http' not in page
    for name in ("elo", "bias", "probe", "steering"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # re-summarised from the results alone, without a model: the same summary
    again = tmp_path / "again"
    assert (
        main(
            [
                "experiment",
                "preferences",
                "--summary",
                str(out / "results.jsonl"),
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert json.loads((again / "summary.json").read_text()) == summary
    # a second run finds everything done and runs nothing
    before = (out / "results.jsonl").read_text()
    assert main(_command(options, out)) == 0
    assert (out / "results.jsonl").read_text() == before


def test_a_killed_run_resumes_to_the_same_results(saved, tmp_path):
    _, _, options = saved
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "emolens.cli",
        *_command(options, tmp_path / "killed", "--batch-size", "1"),
    ]
    results = tmp_path / "killed" / "results.jsonl"
    partial = kill_after_lines(command, env, results, 3, timeout=120)
    assert 3 <= partial < 40, "the run was not killed midway"
    subprocess.run(command, env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "emolens.cli", *_command(options, whole, "--batch-size", "1")],
                   env=env, check=True, capture_output=True)  # fmt: skip

    def outputs(path):
        rows = read_results(path).rows
        return {r["trial"]: (r.get("output"), r.get("readout"), r["seed"]) for r in rows}

    assert outputs(results) == outputs(whole / "results.jsonl")
    resumed, unbroken = (
        json.loads((path / "summary.json").read_text()) for path in (tmp_path / "killed", whole)
    )
    resumed.pop("seconds"), unbroken.pop("seconds")  # model time differs from run to run
    assert resumed == unbroken


def test_bad_input_gives_one_clear_error_and_keeps_results(saved, tmp_path, capsys):
    _, _, options = saved
    out = tmp_path / "run"
    assert main(_command(options, out, "--emotions", "bored")) == 2
    assert "unknown emotion 'bored'" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()
    assert main(_command(options, out, "--steer", "calm=lots")) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(_command(options, out)) == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    # a corrupt line in the middle is reported with its line number, the rest is kept
    results.write_text("\n".join(lines[:3] + ['{"trial": broken'] + lines[3:]) + "\n")
    capsys.readouterr()
    assert main(_command(options, out)) == 0
    err = capsys.readouterr().err
    assert "results.jsonl:4: malformed JSON" in err
    kept = results.read_text().splitlines()
    assert kept[:4] == lines[:3] + ['{"trial": broken'] and len(kept) >= len(lines) + 1
    # results from another model, or another item set, are refused
    other = save_for_cli(tmp_path / "other", tiny_llama(context=1024, seed=9),
                         lambda m: random_bank(EMOTIONS, list(range(m.depth)), m.width))[2]  # fmt: skip
    assert main(_command(other, out)) == 2
    assert "another model" in capsys.readouterr().err
    activities = tmp_path / "activities.jsonl"
    rows = load_activities()
    rows[0] = {**rows[0], "text": "do something else entirely"}
    activities.write_text("".join(json.dumps(a) + "\n" for a in rows))
    assert main(_command(options, out, "--activities", str(activities))) == 2
    assert "has changed" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(_command(options, tmp_path / "x", "--activities", str(empty))) == 2
    assert "at least two activities" in capsys.readouterr().err


def test_the_python_api(saved, tmp_path):
    from emolens.experiments import run

    lm, bank, _ = saved
    summary = run("preferences", lm, bank, out=tmp_path / "api", steer={"calm": [0, 0.5]},
                  layers=[1], limit=4, opponents=1)  # fmt: skip
    assert summary["games"] == 12 and [e["condition"] for e in summary["steering"]["effects"]] == [
        "calm=+0.5@1"
    ]
    assert Condition.make({"calm": 0.5}, [1], "activity").name == "calm=+0.5@1"
    assert isinstance(Preferences.create(limit=8), Preferences)
