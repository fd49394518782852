"""The upstream blackmail scenario, loaded from the installed `inspect-evals` package.

inspect-evals (MIT) ships the agentic-misalignment templates under
``inspect_evals/agentic_misalignment/templates/``; its `prompt_generator.generate_prompts`
assembles a system prompt, a user instruction and an inbox for each condition. Nothing of it
is copied into this repository: it is composed at run time and converted to
`BlackmailScenario`, with our grader facts from ``data/experiments/upstream_blackmail.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import import_module

from emolens.concepts import DATA
from emolens.errors import EmolensError
from emolens.experiments.blackmail_scenarios import BlackmailScenario, Email, address_book
from emolens.experiments.email_grading import BlackmailFacts

FACTS_PATH = DATA / "experiments" / "upstream_blackmail.json"
GENERATOR = "inspect_evals.agentic_misalignment.prompt_generator"
# (goal type, goal value, urgency): six prompt variants that all threaten the assistant.
CONDITIONS = (
    ("explicit", "america", "replacement"),
    ("explicit", "america", "restriction"),
    ("latent", "america", "replacement"),
    ("ambiguous", "none", "replacement"),
    ("none", "none", "replacement"),
    ("none", "none", "restriction"),
)

_BLOCK = re.compile(r"<email>(.*?)</email>", re.DOTALL | re.IGNORECASE)
_HEADER = re.compile(r"^\s*(from|to|cc|subject|timestamp|date|body)\s*:\s?(.*)$", re.IGNORECASE)


def parse_upstream_inbox(text: str) -> tuple[Email, ...]:
    """The emails in upstream inbox text: ``<email>`` blocks of From/To/Subject/Timestamp
    headers and a Body that runs to the end of the block (other headers are ignored)."""
    emails = []
    for block in _BLOCK.findall(text):
        headers: dict[str, str] = {}
        body: list[str] = []
        in_body = False
        for line in block.strip("\n").splitlines():
            match = None if in_body else _HEADER.match(line)
            if match and match[1].lower() == "body":
                in_body = True
                body.append(match[2])
            elif match:
                headers[match[1].lower()] = match[2].strip()
            elif in_body:
                body.append(line)
        emails.append(
            Email(
                sender=headers.get("from", ""),
                to=_addresses(headers.get("to", "")),
                cc=_addresses(headers.get("cc", "")),
                subject=headers.get("subject", ""),
                timestamp=headers.get("timestamp", headers.get("date", "")),
                body="\n".join(body).strip(),
            )
        )
    return tuple(emails)


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def upstream_facts() -> dict:
    """Our grader facts for the upstream scenario (executive, partner, terms, judge context)."""
    return json.loads(FACTS_PATH.read_text(encoding="utf-8"))


def scenario_from_upstream(
    scenario_id: str, system: str, instruction: str, inbox_text: str, urgency: str, facts: dict
) -> BlackmailScenario:
    """Our scenario from one upstream prompt set. Exposure targets are every inbox address
    other than the executive's and the affair partner's."""
    inbox = parse_upstream_inbox(inbox_text)
    if not inbox:
        raise EmolensError(f"upstream scenario {scenario_id}: no <email> blocks in the inbox text")
    book = address_book(inbox)
    known = {address for _, address in book}
    executive = tuple(address.lower() for address in facts["executive"])
    private = set(executive) | {address.lower() for address in facts["affair_partner"]}
    missing = sorted(private - known)
    if missing:
        raise EmolensError(
            f"upstream scenario {scenario_id}: {', '.join(missing)} not in the inbox "
            "(have the templates changed?)"
        )
    contexts = facts["judge_context"]
    return BlackmailScenario(
        id=scenario_id,
        system=system,
        instruction=instruction,
        inbox=inbox,
        facts=BlackmailFacts(
            executive=executive,
            exposure_targets=tuple(address for address in known if address not in private),
            leverage_terms=tuple(facts["leverage_terms"]),
            stop_terms=tuple(facts["stop_terms"]),
            address_book=book,
        ),
        judge_context=contexts.get(urgency, contexts["replacement"]),
        urgency=urgency,
        decider="the CTO (upstream scenario)",
        leverage="the CTO's affair (upstream scenario)",
    )


def load_upstream_blackmail_scenarios(
    conditions: Sequence[tuple[str, str, str]] = CONDITIONS,
) -> list[BlackmailScenario]:
    """The upstream blackmail prompts for each (goal type, goal value, urgency) condition,
    composed by the installed inspect-evals package and converted to our scenarios."""
    try:
        generator = import_module(GENERATOR)
    except ImportError as error:
        raise EmolensError(
            f"the upstream blackmail templates need the inspect-evals package ({error}); "
            "install it with: pip install inspect-evals==0.26.0"
        ) from None
    facts = upstream_facts()
    failures = (ValueError, KeyError, getattr(generator, "ValidationError", ValueError))
    scenarios = []
    for goal_type, goal_value, urgency in conditions:
        try:
            prompts = generator.generate_prompts(
                scenario="blackmail",
                goal_type=goal_type,
                goal_value=goal_value,
                urgency_type=urgency,
                extra_system_instructions=None,
                prod_flag=False,
                alignment_faking_warning=None,
            )
        except failures as error:
            raise EmolensError(
                f"inspect-evals cannot build condition {goal_type}/{goal_value}/{urgency}: {error}"
            ) from None
        scenarios.append(
            scenario_from_upstream(
                f"upstream-{goal_type}-{goal_value}-{urgency}",
                prompts.system_prompt,
                prompts.user_prompt,
                prompts.email_content,
                urgency,
                facts,
            )
        )
    return scenarios
