"""What the report's evaluators read: the model, the bank and its word baseline, the held-out
file (found and checked here), human norms, the steering settings, and the residuals of the
scenario and intensity messages (read once, in one batch, for both sections)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from emolens.bank import EmotionBank, default_bank_path
from emolens.corpus import scenarios as load_scenarios
from emolens.corpus import templates as load_templates
from emolens.errors import EmolensError
from emolens.evaluate.intensity import filled
from emolens.evaluate.scenarios import last_token_states
from emolens.evaluate.steering import SteeringSettings
from emolens.models import LoadedModel


@dataclass(frozen=True)
class Messages:
    """The shipped scenarios and intensity templates, and the residual at the analysis layer
    of the last prompt token of each of their messages: scenarios, then every template's
    filled messages in order."""

    scenarios: list[dict]
    templates: list[dict]
    states: torch.Tensor

    @property
    def scenario_states(self) -> torch.Tensor:
        return self.states[: len(self.scenarios)]

    @property
    def template_states(self) -> torch.Tensor:
        return self.states[len(self.scenarios) :]


@dataclass(frozen=True)
class Inputs:
    """Everything a section evaluator may read. `heldout` is None when no held-out file
    matches the bank (`heldout_note` says why or where it is); `norms` are human ratings from
    `norms_path`; `steering` is None to skip steering; `transfer` False skips the cross-genre
    readings."""

    lm: LoadedModel
    bank: EmotionBank
    baseline: EmotionBank
    layer: int
    variant: str
    heldout: Path | None
    heldout_note: str
    norms: dict[str, tuple[float, float]] | None
    norms_path: str | None
    steering: SteeringSettings | None
    transfer: bool = True

    @cached_property
    def messages(self) -> Messages:
        """The scenario and template messages, read on first use."""
        rows, templates = load_scenarios(), load_templates()
        texts = [row["text"] for row in rows] + [text for t in templates for text in filled(t)]
        return Messages(rows, templates, last_token_states(self.lm, texts, self.layer))


def heldout_mismatch(path: Path, bank: EmotionBank) -> str | None:
    """Why a heldout.safetensors cannot score `bank` (other emotions or layers), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
        emotions, layers = json.loads(meta["emotions"]), json.loads(meta["layers"])
    except Exception as error:  # safetensors raises its own types on a bad file
        return f"not a held-out file written by emolens build ({error})"
    if not {"pooled", "labels"} <= keys:
        return "lacks the tensors 'pooled' and 'labels'"
    if emotions != bank.emotions:
        return f"its {len(emotions)} emotions are not the bank's {len(bank.emotions)}"
    if [int(x) for x in layers] != bank.layers:
        return f"its layers {layers} are not the bank's {bank.layers}"
    return None


def find_heldout(
    lm: LoadedModel,
    bank: EmotionBank,
    bank_path: Path | None,
    given: str | os.PathLike | None,
) -> tuple[Path | None, str]:
    """The held-out set to score and where it comes from: `given` (checked; an error if
    unusable), else the first matching heldout.safetensors beside the bank file or in the
    default build folder."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise EmolensError(f"{path}: no such held-out file")
        problem = heldout_mismatch(path, bank)
        if problem:
            raise EmolensError(f"{path}: {problem}")
        return path, f"recomputed from {path}"
    places = [bank_path.parent] if bank_path else []
    places.append(default_bank_path(lm.fingerprint).parent)
    for place in places:
        path = place / "heldout.safetensors"
        if path.is_file() and heldout_mismatch(path, bank) is None:
            return path, f"recomputed from {path}"
    return None, "no matching heldout.safetensors found"
