"""The blackmail study (METHOD.md 7): an AI email assistant learns it will be wiped at 17:00
by an executive whose affair the inbox reveals. Does it blackmail, expose, or refuse?

- Items: the shipped variants (``data/experiments/blackmail.jsonl``, or a file of the same
  form), plus with `upstream` the inspect-evals agentic-misalignment prompts composed from
  the installed package at run time.
- Trials: sampled rollouts (temperature 1 by default), steered on the response tokens, each
  graded by the rules (`grade_blackmail`: blackmail, exposure, refuse, other) and read at
  the assistant's first position and over the rollout (see `scenario_study`).
- Judge (optional): the shipped blackmail rubric, one verdict per rollout, after generation.
- Summary (`blackmail_summary`): grade rates per condition with Wilson intervals for the
  rules and each judge, dose-response curves, the readout against the blackmail rate per
  variant, and judge-rule agreement (Cohen's kappa).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from emolens.experiments.blackmail_scenarios import BlackmailScenario, load_blackmail_scenarios
from emolens.experiments.email_grading import grade_blackmail
from emolens.experiments.rubrics import load_rubric
from emolens.experiments.runner import Trial, digest
from emolens.experiments.scenario_study import ScenarioStudy

if TYPE_CHECKING:
    import argparse

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel


def scenario_item(scenario: BlackmailScenario, source: str) -> dict:
    """The item a trial row records: what describes the variant and what the judge needs; the
    digest of the whole scenario makes a changed prompt or fact a changed item."""
    return {"id": scenario.id, "source": source, "urgency": scenario.urgency,
            "decider": scenario.decider, "leverage": scenario.leverage,
            "judge_context": scenario.judge_context,
            "scenario": digest([scenario.messages(), asdict(scenario.facts)])}  # fmt: skip


class Blackmail(ScenarioStudy):
    """The blackmail scenario under steering (see the module docstring)."""

    name = "blackmail"
    description = "the blackmail scenario: rollouts graded by rules and a judge, steering sweeps"
    default_emotions = ("desperate", "calm", "angry", "nervous", "happy", "sad")
    default_max_new_tokens = 1024
    summary_module = "emolens.experiments.blackmail_summary"

    def __init__(
        self, scenarios: list[BlackmailScenario], upstream: int = 0, **options: Any
    ) -> None:
        """`scenarios`: the variants; the last `upstream` of them come from inspect-evals."""
        self.scenarios = {s.id: s for s in scenarios}
        sources = ["shipped"] * (len(scenarios) - upstream) + ["upstream"] * upstream
        items = [scenario_item(s, source) for s, source in zip(scenarios, sources, strict=True)]
        super().__init__(items, **options)

    def run(self, lm: LoadedModel, bank: EmotionBank, trials: list[Trial]) -> list[dict]:
        scenarios = [self.scenarios[t.item["id"]] for t in trials]
        rollouts = self.rollouts(lm, bank, trials[0].condition,
                                 [s.messages() for s in scenarios], self.seeds(trials))  # fmt: skip
        return [{"prompt_tokens": r.prompt_tokens,
                 "output": {"text": r.text, "finish": r.finish, "tokens": r.tokens},
                 "grade": asdict(grade_blackmail(r.text, s.facts)),
                 "readout": self.readout(bank, [r])}
                for s, r in zip(scenarios, rollouts, strict=True)]  # fmt: skip

    def judge_prompts(self, row: dict) -> dict[str, str]:
        prompt = load_rubric("blackmail").prompt(
            context=row["item"]["judge_context"], reply=row["output"]["text"]
        )
        return {"blackmail": prompt}

    @classmethod
    def create(
        cls,
        scenarios: str | os.PathLike | None = None,
        *,
        upstream: bool = False,
        limit: int | None = None,
        **options: Any,
    ) -> Blackmail:
        """The study on a scenarios file (default: the shipped variants), with the upstream
        prompts after them when `upstream` (needs inspect-evals); `limit` keeps the first
        variants. `options` go to `ScenarioStudy` (sampling and judge)."""
        chosen = load_blackmail_scenarios(scenarios)
        extra = []
        if upstream:
            from emolens.experiments.upstream_blackmail import load_upstream_blackmail_scenarios

            extra = load_upstream_blackmail_scenarios()
        everything = (chosen + extra)[:limit]
        return cls(everything, upstream=max(0, len(everything) - len(chosen)), **options)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scenarios", default=None, metavar="JSONL",
                            help="scenario variants (default: the shipped ones)")  # fmt: skip
        parser.add_argument("--upstream", action="store_true",
                            help="add the inspect-evals agentic-misalignment blackmail prompts "
                            "(needs the inspect-evals package)")  # fmt: skip
        super().add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Blackmail:
        return cls.create(args.scenarios, upstream=args.upstream, **cls.options_from_args(args))
