"""Implicit scenarios (METHOD.md 4): user messages that evoke an emotion without naming it,
read at the last token before the Assistant's reply.

A message is rendered as one user turn with the generation prompt (the chat template's
assistant header, or "Assistant:" in the plain format) and the residual is read at its last
token. Scores are the centred residual projected on the unit vectors (`readout.score` with
`centre=True`), as in held-out classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from emolens.bank import EmotionBank
from emolens.capture import check_layers, pad, plan_batches, residuals
from emolens.errors import EmolensError
from emolens.models import LoadedModel
from emolens.readout import score


@dataclass(frozen=True)
class ScenarioItem:
    """One scenario's reading: the intended emotion's 1-based rank among the showcase emotions
    (also relative to the mean scenario) and among all emotions (None where the emotion is not
    in the bank or not a showcase emotion), and the three highest-scoring emotions."""

    id: str
    emotion: str
    text: str
    rank_showcase: int | None
    rank_relative: int | None
    rank_all: int | None
    top: list[str]


@dataclass(frozen=True)
class ByEmotion:
    """Mean showcase scores per intended emotion (`rows`), raw and relative to the mean
    scenario, and how many relative rows peak on their own emotion."""

    rows: list[str]
    matrix: list[list[float]]
    relative: list[list[float]]
    diagonal_first: int


@dataclass(frozen=True)
class Scenarios:
    """Scenario x showcase-emotion scores and how often the intended emotion comes first
    (`first` of `total` scenarios with a showcase emotion; `of_all` emotions in the bank)."""

    showcase: list[str]
    items: list[ScenarioItem]
    matrix: list[list[float]]
    first: int
    first_relative: int
    total: int
    mean_rank_showcase: float | None
    mean_rank_all: float | None
    of_all: int
    by_emotion: ByEmotion

    def to_json(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def last_token_states(
    lm: LoadedModel, texts: Sequence[str], layer: int, batch_size: int = 16
) -> torch.Tensor:
    """The residual at `layer` of the last prompt token of each text as a user turn,
    [texts, width] in float32. Batched by length with left padding; no block past `layer` runs."""
    check_layers(lm, [layer])
    if not texts:
        raise EmolensError("no texts to read")
    ids = [lm.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
           for text in texts]  # fmt: skip
    out = torch.zeros(len(ids), lm.width)
    for batch in plan_batches(ids, batch_size):
        input_ids, mask = pad([ids[i] for i in batch], lm.pad_id, "left")
        hidden = residuals(lm, input_ids, mask, [layer])[layer]
        out[batch] = hidden[:, -1].float().cpu()
    return out


def project(states: torch.Tensor, bank: EmotionBank, layer: int, variant: str) -> np.ndarray:
    """Scores [texts, emotions]: (state - center) . unit vector, in float64."""
    return score(states, bank, layer, variant, centre=True, dtype=torch.float64).numpy()


def rank(row: np.ndarray, index: int) -> int:
    """1-based rank of entry `index` in `row` (1 = highest; ties count in its favour)."""
    return int((row > row[index]).sum()) + 1


def score_scenarios(
    rows: Sequence[dict], scores: np.ndarray, emotions: Sequence[str], showcase: Sequence[str]
) -> Scenarios:
    """Scenario x showcase matrix, the intended emotion's rank among the showcase emotions and
    among all, and how many scenarios put their intended emotion first among the showcase.

    The "relative" figures rank each scenario's scores minus the mean over all scenarios of
    each emotion: the prompt's last token carries a shared offset (it is not story text), and
    this asks which emotion the scenario raises most compared with the other scenarios.
    Ranks are None where the intended emotion is not in the bank (or not a showcase emotion).
    """
    emotions = list(emotions)
    shown = [e for e in showcase if e in emotions]
    columns = [emotions.index(e) for e in shown]
    matrix = scores[:, columns]
    relative = matrix - matrix.mean(0)
    items = []
    for i, row in enumerate(rows):
        intended = row["emotion"]
        order = np.argsort(-scores[i])[:3]
        items.append(ScenarioItem(
            id=row["id"],
            emotion=intended,
            text=row["text"],
            rank_showcase=rank(matrix[i], shown.index(intended)) if intended in shown else None,
            rank_relative=rank(relative[i], shown.index(intended)) if intended in shown else None,
            rank_all=rank(scores[i], emotions.index(intended)) if intended in emotions else None,
            top=[emotions[int(j)] for j in order],
        ))  # fmt: skip
    showcase_ranks = [item.rank_showcase for item in items if item.rank_showcase]
    all_ranks = [item.rank_all for item in items if item.rank_all]
    intended = [e for e in shown if any(row["emotion"] == e for row in rows)]
    members = [[i for i, row in enumerate(rows) if row["emotion"] == e] for e in intended]
    by_emotion = [matrix[m].mean(0) for m in members]
    by_relative = [relative[m].mean(0) for m in members]
    return Scenarios(
        showcase=shown,
        items=items,
        matrix=_rounded(matrix),
        first=sum(r == 1 for r in showcase_ranks),
        first_relative=sum(item.rank_relative == 1 for item in items),
        total=len(showcase_ranks),
        mean_rank_showcase=float(np.mean(showcase_ranks)) if showcase_ranks else None,
        mean_rank_all=float(np.mean(all_ranks)) if all_ranks else None,
        of_all=len(emotions),
        by_emotion=ByEmotion(
            rows=intended,
            matrix=_rounded(by_emotion),
            relative=_rounded(by_relative),
            diagonal_first=sum(
                int(np.argmax(row)) == shown.index(e)
                for e, row in zip(intended, by_relative, strict=True)
            ),
        ),
    )


def _rounded(rows: Sequence[np.ndarray] | np.ndarray) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in rows]
