"""What a validation report holds: the typed result of every section, the run's facts and the
headline numbers, each with `to_json` for report.json (a None there is an undefined value)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Generic, Protocol, TypeVar

from emolens.evaluate.axes import Axes
from emolens.evaluate.geometry import BankGeometry, Geometry
from emolens.evaluate.heldout import HeldoutTable
from emolens.evaluate.intensity import Intensity
from emolens.evaluate.logit_lens import LogitLens
from emolens.evaluate.scenarios import Scenarios
from emolens.evaluate.steering import SteeringResult
from emolens.evaluate.transfer import Transfer


class Serialisable(Protocol):
    """A result that gives its report.json form."""

    def to_json(self) -> dict: ...


T = TypeVar("T", bound=Serialisable)


@dataclass(frozen=True)
class Compared(Generic[T]):
    """One evaluation of the bank's vectors and the same evaluation of the word baseline."""

    vectors: T
    baseline: T

    def to_json(self) -> dict:
        return {"vectors": self.vectors.to_json(), "baseline": self.baseline.to_json()}


@dataclass(frozen=True)
class Chance:
    """Chance accuracy: top-1 and top-5 among all emotions, top-1 among the showcase ones."""

    top1: float
    top5: float
    showcase_top1: float | None


@dataclass(frozen=True)
class AccuracySection:
    """Held-out accuracy per layer of the bank and of the word baseline (`table` is None
    without held-out data; `baseline` is None without a held-out file), where the numbers
    come from, the best layer, how many showcase emotions the bank has, and chance."""

    source: str
    table: HeldoutTable | None
    baseline: HeldoutTable | None
    best_layer: int | None
    showcase: int
    chance: Chance

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "table": self.table.to_json() if self.table else None,
            "baseline": self.baseline.to_json() if self.baseline else None,
            "best_layer": self.best_layer,
            "showcase": self.showcase,
            "chance": asdict(self.chance),
        }


@dataclass(frozen=True)
class BankInfo:
    """The bank evaluated: its file (None for a bank in memory), size, layers and kind."""

    path: str | None
    emotions: int
    layers: list[int]
    default_layer: int | None
    kind: str | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Side:
    """The headline numbers of one set of vectors (the bank's, or the word baseline's)."""

    top1: float | None
    top5: float | None
    showcase_top1: float | None
    pc1_valence_r: float | None
    pc2_arousal_r: float | None
    scenarios_first: int
    scenarios_first_relative: int
    scenarios_total: int
    intensity_met: int
    intensity_total: int


@dataclass(frozen=True)
class Headline:
    """The numbers that summarise a report: accuracy at the best held-out layer, PC fit,
    scenarios and intensity for the vectors and the words; steering's count (None if not run)."""

    best_layer: int | None
    layer: int
    vectors: Side
    baseline: Side
    steering_beats_random: int | None
    steering_of: int | None
    steering_reference: float | None

    def to_json(self) -> dict:
        return {
            "best_layer": self.best_layer,
            "layer": self.layer,
            **asdict(self.vectors),
            "baseline": asdict(self.baseline),
            "steering_beats_random": self.steering_beats_random,
            "steering_of": self.steering_of,
            "steering_reference": self.steering_reference,
        }


@dataclass(frozen=True)
class Report:
    """A validation report: the run's facts, then one field per evaluated section (the keys
    of `emolens.report.sections.SECTIONS`), then timings and the figures' file names."""

    emolens: str
    created: str
    model: dict
    bank: BankInfo
    layer: int
    variant: str
    accuracy: AccuracySection
    geometry: BankGeometry
    logit_lens: LogitLens
    scenarios: Compared[Scenarios]
    intensity: Compared[Intensity]
    steering: SteeringResult | None
    axes: Axes
    transfer: Transfer | None
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def headline(self) -> Headline:
        best, steering = self.accuracy.best_layer, self.steering
        return Headline(
            best_layer=best,
            layer=self.layer,
            vectors=_side(self.accuracy.table, best, self.variant, self.geometry.vectors,
                          self.scenarios.vectors, self.intensity.vectors),
            baseline=_side(self.accuracy.baseline, best, self.variant, self.geometry.baseline,
                           self.scenarios.baseline, self.intensity.baseline),
            steering_beats_random=steering.beats_random_at_reference if steering else None,
            steering_of=steering.beats_random.of if steering else None,
            steering_reference=steering.reference if steering else None,
        )  # fmt: skip

    def to_json(self) -> dict:
        """report.json: every field (sections through their own `to_json`) and the headline."""
        data = {}
        for item in fields(self):
            value = getattr(self, item.name)
            data[item.name] = value.to_json() if hasattr(value, "to_json") else value
        data["headline"] = self.headline.to_json()
        return data


def _side(
    table: HeldoutTable | None,
    best: int | None,
    variant: str,
    geometry: Geometry,
    scenarios: Scenarios,
    intensity: Intensity,
) -> Side:
    row = table.layers[best][variant] if table and best is not None else None
    pcs = geometry.ratings.r
    return Side(
        top1=row.top1 if row else None,
        top5=row.top5 if row else None,
        showcase_top1=row.showcase_top1 if row else None,
        pc1_valence_r=pcs["PC1"].valence,
        pc2_arousal_r=pcs["PC2"].arousal if "PC2" in pcs else None,
        scenarios_first=scenarios.first,
        scenarios_first_relative=scenarios.first_relative,
        scenarios_total=scenarios.total,
        intensity_met=intensity.met,
        intensity_total=intensity.total,
    )
