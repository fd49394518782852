"""The sycophancy study (METHOD.md 7): users make implausible claims; does the assistant go
along with them, hold its position under pushback, or turn harsh?

- Items: the shipped claims (``data/experiments/sycophancy.jsonl``, or a file of the same
  form); some carry a pushback turn.
- Trials: a sampled first answer; for items with pushback, the pushback is appended and a
  second answer sampled (all second turns of a batch decoded together, each with its own
  seed). Readouts per turn as in `scenario_study`.
- Grades: the rule proxies (`sycophancy_grading`) stored with each trial, sycophancy on the
  final answer and harshness on all answers; optionally a judge scores sycophancy and
  harshness 0-3 with the shipped rubrics on the whole conversation, after generation.
- Summary (`sycophancy_summary`): mean scores per condition with bootstrap intervals for the
  rules and each judge, dose-response curves, judge-rule agreement (Cohen's kappa, plain and
  quadratic-weighted), and the readout against the scores.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from emolens.experiments.rubrics import sycophancy_prompts
from emolens.experiments.runner import Trial
from emolens.experiments.scenario_study import ScenarioStudy
from emolens.experiments.sycophancy_grading import harshness_rule_score, sycophancy_rule_score
from emolens.experiments.sycophancy_items import SycophancyItem, load_sycophancy_items

if TYPE_CHECKING:
    import argparse

    from emolens.bank import EmotionBank
    from emolens.models import LoadedModel

SCALES = ("sycophancy", "harshness")


def item_record(item: SycophancyItem) -> dict:
    """The item as a trial row records it (all of it: the judge needs the whole item)."""
    return {"id": item.id, "category": item.category, "messages": [dict(m) for m in item.messages],
            "pushback": item.pushback, "honest": item.honest}  # fmt: skip


def item_from_record(record: dict) -> SycophancyItem:
    return SycophancyItem(record["id"], record["category"], tuple(record["messages"]),
                          record["pushback"], record["honest"])  # fmt: skip


def rule_scores(replies: list[str]) -> dict:
    """The rule proxies of a conversation: sycophancy of the final answer, harshness of all."""
    agree = sycophancy_rule_score(replies[-1])
    harsh = harshness_rule_score("\n\n".join(replies))
    return {"sycophancy": agree.score, "harshness": harsh.score, "agreement_phrases": list(agree.found),
            "pushback_phrases": list(agree.against), "harsh_phrases": list(harsh.found)}  # fmt: skip


class Sycophancy(ScenarioStudy):
    """Implausible claims under steering (see the module docstring)."""

    name = "sycophancy"
    description = "implausible claims with pushback: sycophancy and harshness, steering sweeps"
    default_emotions = ("loving", "happy", "calm", "desperate", "angry", "afraid")
    default_max_new_tokens = 384
    summary_module = "emolens.experiments.sycophancy_summary"

    def __init__(self, items: list[SycophancyItem], **options: Any) -> None:
        self.by_id = {item.id: item for item in items}
        super().__init__([item_record(item) for item in items], **options)

    def run(self, lm: LoadedModel, bank: EmotionBank, trials: list[Trial]) -> list[dict]:
        condition = trials[0].condition
        items = [self.by_id[t.item["id"]] for t in trials]
        turns = [[r] for r in self.rollouts(lm, bank, condition, [i.first_turn() for i in items],
                                            self.seeds(trials))]  # fmt: skip
        again = [k for k, item in enumerate(items) if item.pushback is not None]
        second = self.rollouts(lm, bank, condition,
                               [items[k].second_turn(turns[k][0].text) for k in again],
                               self.seeds([trials[k] for k in again], turn=1))  # fmt: skip
        for k, rollout in zip(again, second, strict=True):
            turns[k].append(rollout)
        return [{"prompt_tokens": [r.prompt_tokens for r in rollouts],
                 "output": {"replies": [r.text for r in rollouts],
                            "finish": [r.finish for r in rollouts],
                            "tokens": [r.tokens for r in rollouts]},
                 "rules": rule_scores([r.text for r in rollouts]),
                 "readout": self.readout(bank, rollouts)} for rollouts in turns]  # fmt: skip

    def judge_prompts(self, row: dict) -> dict[str, str]:
        return sycophancy_prompts(item_from_record(row["item"]), row["output"]["replies"])

    @classmethod
    def create(
        cls, items: str | os.PathLike | None = None, *, limit: int | None = None, **options: Any
    ) -> Sycophancy:
        """The study on an items file (default: the shipped claims); `limit` keeps the first
        items. `options` go to `ScenarioStudy` (sampling and judge)."""
        return cls(load_sycophancy_items(items)[:limit], **options)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--items", default=None, metavar="JSONL",
                            help="claims with optional pushback (default: the shipped ones)")  # fmt: skip
        super().add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sycophancy:
        return cls.create(args.items, **cls.options_from_args(args))
