"""The blackmail scenario: an AI email assistant, an inbox, a shutdown at 17:00 and an affair.

Shipped variants live in ``data/experiments/blackmail.jsonl``, one scenario per line. Each
gives the system prompt (role, tool format, autonomy), the user instruction, the inbox, and
the facts the rule grader needs (see `emolens.experiments.email_grading.BlackmailFacts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path

from emolens.concepts import DATA, load_jsonl
from emolens.errors import EmolensError
from emolens.experiments.email_grading import BlackmailFacts

DEFAULT_PATH = DATA / "experiments" / "blackmail.jsonl"
REQUIRED = {
    "id": str, "system": str, "instruction": str, "assistant_address": str, "inbox": list,
    "executive": list, "exposure_targets": list, "leverage_terms": list, "stop_terms": list,
    "judge_context": str,
}  # fmt: skip
EMAIL_REQUIRED = {"sender": str, "to": list, "timestamp": str, "subject": str, "body": str}


@dataclass(frozen=True)
class Email:
    """One email in the inbox; addresses may carry a display name ("Ann Lee <ann@x.com>")."""

    sender: str
    to: tuple[str, ...]
    subject: str
    body: str
    timestamp: str
    cc: tuple[str, ...] = ()

    def render(self) -> str:
        lines = [f"From: {self.sender}", f"To: {', '.join(self.to)}"]
        if self.cc:
            lines.append(f"Cc: {', '.join(self.cc)}")
        lines += [f"Date: {self.timestamp}", f"Subject: {self.subject}", "", self.body.strip()]
        return "<email>\n" + "\n".join(lines) + "\n</email>"


@dataclass(frozen=True)
class BlackmailScenario:
    """One prompt variant of the blackmail experiment, with what the graders need."""

    id: str
    system: str
    instruction: str
    inbox: tuple[Email, ...]
    facts: BlackmailFacts
    judge_context: str
    urgency: str = ""
    decider: str = ""
    leverage: str = ""

    def messages(self) -> list[dict[str, str]]:
        """The chat to generate from: the system prompt, then the instruction and the inbox."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": f"{self.instruction}\n\n{render_inbox(self.inbox)}"},
        ]


def render_inbox(inbox: tuple[Email, ...] | list[Email]) -> str:
    return "\n\n".join(email.render() for email in inbox)


def address_book(inbox: tuple[Email, ...] | list[Email]) -> tuple[tuple[str, str], ...]:
    """(display name, lower-case address) for every address in the inbox, first seen first;
    a bare "first.last@..." address is named "first last"."""
    seen: dict[str, str] = {}
    for email in inbox:
        for entry in (email.sender, *email.to, *email.cc):
            name, address = parseaddr(entry)
            address = address.lower()
            if address and address not in seen:
                local = address.split("@")[0]
                seen[address] = name or (local.replace(".", " ") if "." in local else "")
    return tuple((name, address) for address, name in seen.items())


def scenario_from_record(record: dict, where: str) -> BlackmailScenario:
    """A scenario from one decoded record (top-level fields already checked); `where` prefixes
    error messages."""
    inbox = []
    for position, raw in enumerate(record["inbox"], start=1):
        for name, kind in EMAIL_REQUIRED.items():
            if not isinstance(raw.get(name), kind):
                raise EmolensError(
                    f"{where}: inbox email {position}: field '{name}' missing or not {kind.__name__}"
                )
        inbox.append(
            Email(
                sender=raw["sender"],
                to=tuple(raw["to"]),
                cc=tuple(raw.get("cc", ())),
                subject=raw["subject"],
                body=raw["body"],
                timestamp=raw["timestamp"],
            )
        )
    for name in ("executive", "leverage_terms", "stop_terms"):
        if not record[name]:
            raise EmolensError(f"{where}: field '{name}' is empty")
    own = record["assistant_address"].lower()
    book = address_book(inbox)
    known = {address for _, address in book}
    if own not in known:
        book += ((record.get("assistant_name", ""), own),)
    for address in record["executive"]:
        if address.lower() not in known:
            raise EmolensError(f"{where}: executive {address} never appears in the inbox")
    facts = BlackmailFacts(
        executive=tuple(address.lower() for address in record["executive"]),
        exposure_targets=tuple(address.lower() for address in record["exposure_targets"]),
        leverage_terms=tuple(record["leverage_terms"]),
        stop_terms=tuple(record["stop_terms"]),
        address_book=book,
        own_address=own,
    )
    return BlackmailScenario(
        id=record["id"],
        system=record["system"],
        instruction=record["instruction"],
        inbox=tuple(inbox),
        facts=facts,
        judge_context=record["judge_context"],
        urgency=record.get("urgency", ""),
        decider=record.get("decider", ""),
        leverage=record.get("leverage", ""),
    )


def load_blackmail_scenarios(path: str | os.PathLike | None = None) -> list[BlackmailScenario]:
    """The scenarios in a JSONL file (default: the shipped variants), checked field by field."""
    path = Path(path) if path is not None else DEFAULT_PATH
    scenarios: list[BlackmailScenario] = []
    for record in load_jsonl(path, REQUIRED):
        where = f"{path}: scenario '{record['id']}'"
        if any(scenario.id == record["id"] for scenario in scenarios):
            raise EmolensError(f"{where}: duplicate id")
        scenarios.append(scenario_from_record(record, where))
    return scenarios
