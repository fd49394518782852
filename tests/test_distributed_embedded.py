"""A Ray build of the embedded SmolLM2-135M-Instruct (two emotions, a few neutral dialogues)
on a local two-CPU cluster equals the single-process build."""

from __future__ import annotations

import pytest

from emolens.build import Recipe, build
from emolens.corpus import Corpus, load
from emolens.distributed import RayWorkers

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def test_ray_build_of_the_embedded_model_equals_the_single_process_bank(embedded, tmp_path):
    records = load().records
    stories = [r for r in records if r.kind == "story" and r.emotion in ("calm", "afraid")]
    corpus = Corpus(stories + [r for r in records if r.kind == "neutral"][:12])
    recipe = Recipe(layers=(embedded.default_layer(),))
    single = build(embedded, corpus, recipe, out=tmp_path / "single", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayWorkers(workers=2, dtype="float32", progress=False) as workers:
            spread = build(embedded, corpus, recipe, out=tmp_path / "ray", checkpoint_every=2,
                           progress=False, executor=workers.build)  # fmt: skip
            assert len(set(workers.computed_by)) == 2
    finally:
        ray.shutdown()
    for name, vectors in single.vectors.items():
        assert (spread.vectors[name] - vectors).abs().max() <= 1e-6
    assert (spread.mean_norm - single.mean_norm).abs().max() <= 1e-6
    assert spread.meta["heldout"] == single.meta["heldout"]
