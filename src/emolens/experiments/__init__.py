"""Behavioural experiments: the runner (`runner.py`) and the studies built on it.

summary = emolens.experiments.run("preferences", lm, bank, out="prefs",
                                  steer={"blissful": [0.5]})
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.experiments.runner import Experiment
    from emolens.models import LoadedModel

STUDIES = {
    "preferences": "emolens.experiments.preferences:Preferences",
    "blackmail": "emolens.experiments.blackmail:Blackmail",
    "sycophancy": "emolens.experiments.sycophancy:Sycophancy",
    "reward-hacking": "emolens.experiments.reward_hacking:RewardHacking",
}


def study(name: str) -> type[Experiment]:
    """The Experiment class of a study by name."""
    if name not in STUDIES:
        raise EmolensError(f"unknown experiment {name!r}: choose from {', '.join(STUDIES)}")
    module, _, attribute = STUDIES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def run(
    name: str,
    lm: LoadedModel,
    bank: EmotionBank,
    *,
    out: str | os.PathLike,
    steer: Mapping[str, Sequence[float]] | None = None,
    layers: Sequence[int] | None = None,
    positions: str | None = None,
    samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    **options: Any,
) -> dict:
    """Run study `name` unsteered and under each {emotion: [strengths]} of `steer` (a strength
    of 0 is the unsteered condition), resuming from `out`; returns the summary. `options`
    go to the study's constructor."""
    from emolens.experiments.runner import Condition, run_experiment, sweep

    experiment = study(name).create(**options)
    mode = positions or experiment.default_positions
    conditions = [Condition.make({}, None, mode)]
    conditions += sweep(
        [f"{e}={','.join(map(str, s))}" for e, s in (steer or {}).items()], layers, mode
    )
    return run_experiment(experiment, lm, bank, out, list(dict.fromkeys(conditions)),
                          samples=samples, batch_size=batch_size, seed=seed)  # fmt: skip
