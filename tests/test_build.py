import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from emolens import concepts
from emolens.bank import EmotionBank
from emolens.build import Recipe, _finish, _State, build, default_layers, probes
from emolens.corpus import Corpus, load
from emolens.errors import EmolensError
from tests.conftest import tiny_llama


def subset(emotions, n_neutral=12, words=60):
    """Shipped stories of some emotions and a few neutral dialogues, cut to `words` words
    (the tiny model's byte tokenizer makes every character a token)."""
    records = load().records
    keep = [r for r in records if r.kind == "story" and r.emotion in emotions]
    keep += [r for r in records if r.kind == "neutral"][:n_neutral]
    return Corpus([replace(r, text=" ".join(r.text.split()[:words])) if r.kind == "story" else r
                   for r in keep])  # fmt: skip


def test_default_layers_sweep_the_middle_and_include_two_thirds():
    assert default_layers(30) == [7, 9, 11, 13, 15, 17, 19, 20, 21]
    assert 12 in default_layers(18) and min(default_layers(18)) == 4


def test_planted_directions_are_recovered_and_neutral_direction_removed():
    g = torch.Generator().manual_seed(0)
    d, n_emotions = 24, 6
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T
    noise, planted = basis[0], basis[1 : 1 + n_emotions] * 3
    state = _State([f"e{i}" for i in range(n_emotions)], [5], d)
    offset = torch.randn(d, generator=g, dtype=torch.float64)  # shared by every story
    for k in range(n_emotions):
        for _ in range(10):
            story = (
                offset + planted[k] + 4 * torch.randn(1, generator=g, dtype=torch.float64) * noise
            )
            state.means.update(torch.tensor([k]), story[None, None, :])
    neutral = torch.randn(500, 1, generator=g, dtype=torch.float64) * 8 * noise
    state.neutral.update(0, neutral + 0.05 * torch.randn(500, d, generator=g, dtype=torch.float64))
    state.norm_sum += 10.0
    state.norm_count += 1
    state.pooled_tokens += 100
    lm = SimpleNamespace(fingerprint={"name": "synthetic"}, default_layer=lambda: 5)
    bank = _finish(lm, state, Recipe(layers=(5,)), Corpus([]), key="k")
    assert bank.meta["denoising"]["components"] == [1]
    expected = planted - planted.mean(0)
    cos = torch.nn.functional.cosine_similarity(
        bank.vectors["denoised"][0].double(), expected, dim=1
    )
    assert (cos > 0.99).all()
    assert (bank.matrix(5) @ noise.float()).abs().max() < 1e-3
    raw_cos = torch.nn.functional.cosine_similarity(
        bank.vectors["raw"][0].double(), expected, dim=1
    )
    assert raw_cos.min() < cos.min()  # the noise direction contaminated the raw vectors
    assert bank.norm_at(5) == 10.0


def test_logistic_probes_separate_planted_classes():
    g = torch.Generator().manual_seed(0)
    state = _State(["a", "b", "c"], [5], 16)
    centres = 3 * torch.randn(3, 16, generator=g)
    labels = [i % 3 for i in range(60)]
    for i, label in enumerate(labels):
        state.train[i] = (centres[label] + torch.randn(16, generator=g))[None]
    directions = probes(state, labels, torch.zeros(1, 16))
    assert directions.shape == (1, 3, 16)
    pooled = torch.stack([state.train[i][0] for i in range(60)])
    assert (
        float(((pooled @ directions[0].T).argmax(1) == torch.tensor(labels)).float().mean()) > 0.95
    )


def test_build_on_a_tiny_model(tmp_path):
    lm = tiny_llama(context=1024)
    corpus = subset(["afraid", "angry", "calm", "happy"])
    bank = build(lm, corpus, Recipe(layers=(1, 3)), out=tmp_path, progress=False)
    assert bank.emotions == ["afraid", "angry", "calm", "happy"]
    assert bank.vectors["denoised"].shape == (2, 4, lm.width)
    assert torch.isfinite(bank.mean_norm).all() and (bank.mean_norm > 0).all()
    summary = json.loads((tmp_path / "build.json").read_text())
    assert set(summary["heldout"]["layers"]) == {"1", "3"}
    assert summary["counts"]["heldout"] == 12 and summary["best_layer"] in (1, 3)
    held = load_file(str(tmp_path / "heldout.safetensors"))
    assert held["pooled"].shape == (12, 2, lm.width)
    # the same build again reuses the bank on disk
    again = build(lm, corpus, Recipe(layers=(1, 3)), out=tmp_path, progress=False)
    assert again.meta["build"] == bank.meta["build"]
    assert not (tmp_path / ".checkpoint.safetensors").exists()
    EmotionBank.load(tmp_path / "bank.safetensors").check_against(lm)


def test_build_refuses_a_corpus_without_neutral_dialogues(tmp_path):
    with pytest.raises(EmolensError, match="no neutral dialogues"):
        build(tiny_llama(context=1024), subset(["calm"], n_neutral=0), out=tmp_path, progress=False)


def _build_command(model_dir, corpus_file, out):
    return [sys.executable, "-m", "emolens.cli", "build", "--model", str(model_dir), "--corpus",
            str(corpus_file), "--out", str(out), "--layers", "1", "3", "--checkpoint-every", "1"]  # fmt: skip


def test_killed_build_resumes_to_the_same_bank(tmp_path):
    lm = tiny_llama(context=1024)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    corpus_file = tmp_path / "corpus.jsonl"
    corpus = subset(concepts.emotions()[:6], n_neutral=12)
    corpus_file.write_text("".join(r.to_json() + "\n" for r in corpus.records))
    env = {**os.environ, "EMOLENS_CACHE": str(tmp_path / "cache")}
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_build_command(model_dir, corpus_file, interrupted), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (interrupted / ".checkpoint.safetensors").exists() and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (interrupted / ".checkpoint.safetensors").exists(), (
        "the build ended before any checkpoint"
    )
    assert not (interrupted / "bank.safetensors").exists(), (
        "the build finished before it was killed"
    )
    subprocess.run(_build_command(model_dir, corpus_file, interrupted), env=env, check=True,
                   capture_output=True)  # fmt: skip
    unbroken = tmp_path / "unbroken"
    subprocess.run(_build_command(model_dir, corpus_file, unbroken), env=env, check=True,
                   capture_output=True)  # fmt: skip
    a = EmotionBank.load(interrupted / "bank.safetensors")
    b = EmotionBank.load(unbroken / "bank.safetensors")
    assert a.meta["build"]["resumed"] and not b.meta["build"]["resumed"]
    for variant in ("raw", "denoised"):
        assert (a.vectors[variant] - b.vectors[variant]).abs().max() <= 1e-6
    assert torch.allclose(a.mean_norm, b.mean_norm, atol=1e-6)


def test_genres_and_probes_options(tmp_path):
    """--genres pools the other genres' train split beside the stories (and never their
    validation split); --probes adds a logistic-probe variant that classifies its own training
    texts well above chance; both change the build key."""
    lm = tiny_llama(context=1024)
    emotions = ["afraid", "angry", "calm", "happy"]
    corpus = subset(emotions)
    genres = [r for r in load().genres() if r.emotion in emotions]
    assert {r.split for r in genres} == {"train", "validation"}
    mixed = Corpus(corpus.records + genres)
    recipe = Recipe(layers=(3,), genres=True, probes=True)
    bank = build(lm, mixed, recipe, out=tmp_path, progress=False)
    assert set(bank.vectors) == {"raw", "denoised", "probe"}
    assert bank.meta["counts"]["genres"] == sum(r.split == "train" for r in genres) > 0
    halves = load_file(str(tmp_path / "halves.safetensors"))
    assert halves["means"].shape == (2, 1, 4, lm.width)
    assert halves["counts"].sum() == len(corpus.stories("train"))  # stories only, both halves
    assert (halves["counts"][0] - halves["counts"][1]).abs().max() <= 1
    assert not torch.allclose(bank.vectors["probe"], bank.vectors["raw"])
    assert "probe" in json.loads((tmp_path / "build.json").read_text())["heldout"]["layers"]["3"]
    plain = build(lm, corpus, Recipe(layers=(3,)), out=tmp_path / "plain", progress=False)
    assert "probe" not in plain.vectors
    assert plain.meta["build_key"] != bank.meta["build_key"]
    with pytest.raises(EmolensError, match="no training texts of other genres"):
        build(lm, corpus, recipe, out=tmp_path / "none", progress=False)
