"""Displays of a readout: a self-contained HTML heatmap of the tokens, and a trajectory plot."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import torch

from emolens.errors import EmolensError
from emolens.figures import save_figure
from emolens.readout import Readout


def heatmap_html(readout: Readout, emotions: Sequence[str] | None = None, top: int = 5) -> str:
    """A self-contained HTML page: the text once per emotion, each token coloured by its
    scaled score (red positive, blue negative), with the top emotions in a tooltip.

    Without `emotions`, the emotion with the highest mean scaled score is shown.
    """
    scaled = readout.scaled()
    if not emotions:
        means = (scaled * readout.valid[:, None]).sum(0) / readout.valid.sum().clamp(min=1)
        emotions = [readout.emotions[int(means.argmax())]]
    tips = [
        html.escape(
            "\n".join(
                [f"{role} (turn {turn})" if turn >= 0 else role]
                + [f"{n}: {v:+.3f}" for n, v in readout.top(top, i)]
            )
        )
        for i, (role, turn) in enumerate(zip(readout.roles, readout.turns, strict=True))
    ]
    blocks = []
    for name in emotions:
        column = scaled[:, readout.emotion_index(name)]
        spans, previous_turn = [], None
        for i, (token, role, turn, tip) in enumerate(
            zip(readout.tokens, readout.roles, readout.turns, tips, strict=True)
        ):
            if turn != previous_turn and turn >= 0 and role != "text":
                spans.append(f'<span class="role">{html.escape(role)}</span>')
            previous_turn = turn
            value = float(column[i])
            colour = "220,50,47" if value >= 0 else "38,120,210"
            style = f"background:rgba({colour},{abs(value):.3f})"
            kind = "tpl" if role == "template" else "tok"
            spans.append(
                f'<span class="{kind}" style="{style}" title="{tip}">{html.escape(token)}</span>'
            )
        blocks.append(f'<h2>{html.escape(name)}</h2>\n<div class="text">{"".join(spans)}</div>')
    title = f"emolens readout, layer {readout.layer} ({readout.variant})"
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
        ".tpl{color:#999}.role{display:inline-block;margin:.6em .4em 0 0;padding:0 .3em;"
        "font-size:70%;background:#eee;border-radius:3px}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Red: the token reads positive on the emotion, blue: negative; intensity is the "
        "score scaled by its 99th-percentile magnitude over the text. Hover a token for its "
        "top emotions.</p>\n" + "\n".join(blocks) + "\n</body></html>\n"
    )


def plot_trajectory(
    readout: Readout, path: str | Path, emotions: Sequence[str] | None = None
) -> Path:
    """Plot the mean score per turn (per sentence for plain text), one line per emotion.

    Without `emotions`, the four that vary most along the text are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = readout.turn_means()
    if len(turns) > 1:
        values = torch.stack([t.scores for t in turns])
        labels = [f"{t.role[0].upper()}{t.turn}" for t in turns]
        roles, xlabel = [t.role for t in turns], "turn (S system, U user, A assistant)"
    else:
        segments = readout.segments()
        if not segments:
            raise EmolensError("nothing to plot: the readout has no text tokens")
        values = torch.stack([readout.segment_mean(s) for s in segments])
        labels = [str(i + 1) for i in range(len(segments))]
        roles, xlabel = [s.role for s in segments], "sentence"
    if not emotions:
        emotions = [readout.emotions[i] for i in values.std(0).topk(min(4, values.shape[1]))[1]]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(labels)), 4))
    x = list(range(len(labels)))
    for i, role in enumerate(roles):
        if role == "user":
            axes.axvspan(i - 0.5, i + 0.5, color="#eeeeee", zorder=0)
    for name in emotions:
        axes.plot(x, values[:, readout.emotion_index(name)].numpy(), marker="o", label=name)
    axes.set_xticks(x, labels, fontsize=8)
    axes.set_xlabel(xlabel + (", grey: user turns" if "user" in roles else ""))
    axes.set_ylabel(f"mean projection, layer {readout.layer}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
