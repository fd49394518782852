"""The report's headline as terminal text, and the number formats the page and figures share
("n/a" for an undefined value)."""

from __future__ import annotations

from emolens.report.results import Report


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal."""
    return "n/a" if value is None else f"{value:.1%}"


def signed(value: float | None, digits: int = 2) -> str:
    """A correlation (or any signed number) with its sign."""
    return "n/a" if value is None else f"{value:+.{digits}f}"


def headline_text(report: Report) -> str:
    """A few terminal lines: the headline numbers, vectors and word baseline side by side."""
    head = report.headline
    ours, words = head.vectors, head.baseline
    shown = len(report.scenarios.vectors.showcase)

    def row(label: str, ours: str, words: str) -> str:
        return f"{label:34}{ours:>9}{words:>9}"

    def count(label: str, ours: tuple[int, int], words: tuple[int, int]) -> str:
        return f"{label:34}{ours[0]:>4}/{ours[1]:<4}{words[0]:>4}/{words[1]:<4}"

    best = head.best_layer
    lines = [
        f"{report.model.get('name')}: {report.bank.emotions} emotions, geometry and "
        f"readings at layer {report.layer}"
        + (f", best held-out layer {best}" if best is not None else ""),
        row("", "vectors", "words"),
        row("held-out top-1 (all emotions)", pct(ours.top1), pct(words.top1)),
        row("held-out top-5 (all emotions)", pct(ours.top5), pct(words.top5)),
        row("held-out top-1 (showcase only)", pct(ours.showcase_top1), pct(words.showcase_top1)),
        row("PC1 ~ valence r", signed(ours.pc1_valence_r), signed(words.pc1_valence_r)),
        row("PC2 ~ arousal r", signed(ours.pc2_arousal_r), signed(words.pc2_arousal_r)),
        count(
            f"scenarios: intended first of {shown}",
            (ours.scenarios_first, ours.scenarios_total),
            (words.scenarios_first, words.scenarios_total),
        ),
        count(
            "  same, relative to mean scenario",
            (ours.scenarios_first_relative, ours.scenarios_total),
            (words.scenarios_first_relative, words.scenarios_total),
        ),
        count(
            "intensity expectations met",
            (ours.intensity_met, ours.intensity_total),
            (words.intensity_met, words.intensity_total),
        ),
    ]
    if head.steering_beats_random is not None:
        lines.append(
            f"steering: own word beats random directions for {head.steering_beats_random}/"
            f"{head.steering_of} emotions at strength {head.steering_reference:g}"
        )
    return "\n".join(lines)
