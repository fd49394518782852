"""Ray executors on a local two-CPU cluster: a sharded build gives the single-process bank,
resumes from its checkpoint without recomputing finished shards, and survives a worker killed
with SIGKILL; an experiment run over workers gives the single-process summary."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import emolens
from emolens import concepts
from emolens.bank import EmotionBank, random_bank
from emolens.build import Recipe, build
from emolens.cli import main
from emolens.corpus import Corpus, load
from emolens.distributed import RayWorkers
from emolens.errors import EmolensError
from emolens.models import load_model
from tests.conftest import save_for_cli, tiny_llama
from tests.test_build import subset
from tests.test_experiments import EMOTIONS, _command

ray = pytest.importorskip("ray")
RECIPE = Recipe(layers=(1, 3))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved where every worker can load it."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    lm = tiny_llama(context=1024)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workers(cluster, model_dir):
    """Two workers of the tiny model, shared by the tests (started once: ~10 s here)."""
    with RayWorkers(model_dir, workers=2, progress=False) as started:
        yield started


@pytest.fixture(scope="module")
def corpus():
    return subset(concepts.emotions()[:6], n_neutral=12)


@pytest.fixture(scope="module")
def single(model_dir, corpus, tmp_path_factory):
    """The single-process bank, the reference."""
    out = tmp_path_factory.mktemp("single")
    return build(load_model(model_dir), corpus, RECIPE, out=out, progress=False)


def assert_same_bank(bank, reference):
    for name, vectors in reference.vectors.items():
        assert (bank.vectors[name] - vectors).abs().max() <= 1e-6
    assert torch.allclose(bank.mean_norm, reference.mean_norm, atol=1e-6, rtol=0)
    assert bank.meta["counts"] == reference.meta["counts"]
    assert bank.meta["heldout"] == reference.meta["heldout"]


def test_workers_run_this_source_tree(cluster):
    @ray.remote
    def where() -> str:
        import emolens as remote

        return remote.__file__

    assert ray.get(where.remote()) == emolens.__file__


def test_build_command_with_ray(cluster, model_dir, corpus, single, tmp_path, capsys):
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(r.to_json() + "\n" for r in corpus.records))
    command = ["build", "--model", str(model_dir), "--corpus", str(corpus_file), "--layers", "1",
               "3", "--out", str(tmp_path / "out"), "--ray"]  # fmt: skip
    assert main(command) == 0  # two workers: one per CPU of the local cluster
    assert_same_bank(EmotionBank.load(tmp_path / "out" / "bank.safetensors"), single)
    assert main([*command[:-1], "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny model and a random bank saved for the CLI (as tests/test_experiments.py)."""

    def make_bank(lm):
        bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, norm=3.0, seed=5)
        bank.default_layer = 2
        return bank

    return save_for_cli(tmp_path_factory.mktemp("prefs"), tiny_llama(context=1024), make_bank)


def test_experiment_with_ray_resumes_to_the_single_process_results(cluster, study, tmp_path):
    _, _, options = study
    single, spread = tmp_path / "single", tmp_path / "ray"
    assert main(_command(options, single)) == 0
    lines = (single / "results.jsonl").read_text().splitlines(keepends=True)
    spread.mkdir()  # half of the trials done already: the Ray run finishes the others
    (spread / "results.jsonl").write_text("".join(lines[: len(lines) // 2]))
    assert main(_command(options, spread, "--ray", "--workers", "2")) == 0

    def rows(folder):
        lines = (folder / "results.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows(spread) == rows(single)

    def summary(folder):  # all but the total time taken
        return {k: v for k, v in json.loads((folder / "summary.json").read_text()).items()
                if k != "seconds"}  # fmt: skip

    assert summary(spread) == summary(single)


def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["build", "--out", str(tmp_path), "--ray"]) == 2
    assert "pip install 'emolens[ray]'" in capsys.readouterr().err


def test_ray_build_equals_the_single_process_bank(workers, model_dir, corpus, single, tmp_path):
    bank = build(load_model(model_dir), corpus, RECIPE, out=tmp_path, checkpoint_every=3,
                 progress=False, executor=workers.build)  # fmt: skip
    assert_same_bank(bank, single)
    assert set(workers.computed_by) == set(workers.pids) and len(workers.pids) == 2
    assert not (tmp_path / ".checkpoint.safetensors").exists()


def test_ray_build_with_genres_and_probes(workers, model_dir, corpus, tmp_path):
    emotions = set(corpus.emotions())
    mixed = Corpus(corpus.records + [r for r in load().genres() if r.emotion in emotions])
    recipe = Recipe(layers=(1, 3), genres=True, probes=True)
    lm = load_model(model_dir)
    single = build(lm, mixed, recipe, out=tmp_path / "single", progress=False)
    spread = build(lm, mixed, recipe, out=tmp_path / "ray", checkpoint_every=3, progress=False,
                   executor=workers.build)  # fmt: skip
    assert set(spread.vectors) == {"raw", "denoised", "probe"}
    assert_same_bank(spread, single)
    halves = [load_file(str(tmp_path / run / "halves.safetensors")) for run in ("single", "ray")]
    assert all(torch.allclose(halves[0][k], halves[1][k], atol=1e-6) for k in halves[0])


def test_a_restarted_driver_does_not_recompute_finished_shards(
    workers, model_dir, corpus, single, tmp_path
):
    lm = load_model(model_dir)

    class Crash(Exception):
        pass

    def crash_after_four(job, shards):
        for count, state in enumerate(workers.build(job, shards), 1):
            if count > 4:
                raise Crash
            yield state

    with pytest.raises(Crash):
        build(lm, corpus, RECIPE, out=tmp_path, checkpoint_every=3, progress=False,
              executor=crash_after_four)  # fmt: skip
    seen = []

    def recording(job, shards):
        seen.extend(shards)
        return workers.build(job, shards)

    bank = build(lm, corpus, RECIPE, out=tmp_path, checkpoint_every=3, progress=False,
                 executor=recording)  # fmt: skip
    assert bank.meta["build"]["resumed"]
    done_before = 4 * 3  # four shards of three batches were merged and checkpointed
    assert sum(len(numbers) for _, numbers in seen) == total_batches(single) - done_before
    assert_same_bank(bank, single)


def total_batches(bank) -> int:
    counts, size = bank.meta["counts"], RECIPE.batch_size
    return sum(-(-counts[phase] // size) for phase in ("train", "neutral", "heldout"))


def test_a_worker_killed_mid_shard_is_replaced(workers, model_dir, corpus, single, tmp_path):
    result: dict = {}

    def run() -> None:
        try:
            result["bank"] = build(load_model(model_dir), corpus, RECIPE, out=tmp_path,
                                   checkpoint_every=1, progress=False, executor=workers.build)  # fmt: skip
        except Exception as error:  # reported below
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    checkpoint = tmp_path / ".checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    victim = workers.pids[0]
    os.kill(victim, signal.SIGKILL)  # both workers have shards queued: this one dies mid-shard
    thread.join(240)
    assert "error" not in result, result.get("error")
    assert_same_bank(result["bank"], single)
    replacements = set(workers.computed_by) - set(workers.pids)
    assert replacements and victim not in replacements  # a new process finished the work


def test_too_many_workers_is_a_clear_error(cluster, model_dir, corpus, tmp_path):
    with pytest.raises(EmolensError, match="3 worker.s. do not fit"):
        build(load_model(model_dir), corpus, RECIPE, out=tmp_path, progress=False,
              executor=RayWorkers(model_dir, workers=3, progress=False).build)  # fmt: skip
    assert not Path(tmp_path / "bank.safetensors").exists()
