"""`emolens chat`: a terminal chat that shows the live emotion readout of every reply."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from emolens.cli._common import (
    add_bank_option,
    add_model_option,
    add_sampling_options,
    add_steering_options,
    load_bank_for,
    load_model_from,
    sampling_from,
)
from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.guard import Guard
    from emolens.models import LoadedModel
    from emolens.steer import SteeringVector

HELP = (
    "commands: /steer NAME=S [NAME=S ...] (set strengths; /steer alone shows them), "
    "/unsteer, /guard RULE (a JSON guard; /guard alone shows it), /unguard, /top N, "
    "/reset (forget the conversation), /quit (or end of input)"
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="chat with a model and watch its emotion readout (with optional steering)",
        description="A terminal chat. After each reply, the top emotions of its mean live "
        "readout are shown. " + HELP + ".",
    )
    add_model_option(parser)
    add_bank_option(parser)
    add_steering_options(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="emotions shown (3)")
    parser.add_argument(
        "--guard",
        default=None,
        metavar="JSON",
        help='a guard rule, e.g. \'{"when": "desperate", "above": 0.6, "window": 8, '
        '"then": {"steer": {"calm": 0.05}}}\' (scaled readout units; see emolens.guard)',
    )
    add_sampling_options(parser, max_new_tokens=128)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    session = Session(lm, bank, args)
    print(f"emolens chat with {lm.name} (layer {session.layer}). {HELP}.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        if not line.strip():
            continue
        try:
            if line.strip().startswith("/"):
                if not session.command(line.strip()):
                    break
            else:
                session.say(line)
        except EmolensError as error:
            print(f"emolens: {error}", flush=True)


class Session:
    """The conversation, the steering in force and the display settings."""

    def __init__(self, lm: LoadedModel, bank: EmotionBank, args: argparse.Namespace) -> None:
        from emolens.readout import resolve_layer

        if args.top < 1:
            raise EmolensError(f"--top must be at least 1, not {args.top}")
        self.lm, self.bank, self.args = lm, bank, args
        self.sampling = sampling_from(args)
        self.layer = resolve_layer(lm, bank, args.layer)
        self.top = args.top
        self.strengths: dict[str, float] = {}
        self.guard: Guard | None = None
        if args.guard is not None:
            self._set_guard(args.guard)
        self.messages: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        system = self.args.system
        self.messages = [{"role": "system", "content": system}] if system else []

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        from emolens.steer import parse_strengths

        name, *rest = line.split()
        if name in ("/quit", "/exit"):
            return False
        if name == "/steer":
            if rest:
                update = parse_strengths(rest, allow_strong=self.args.allow_strong)
                wanted = {k: v for k, v in {**self.strengths, **update}.items() if v != 0}
                if wanted:  # an unknown emotion fails here, before it is kept
                    self._vector(wanted)
                self.strengths = wanted
            print(f"steering: {self._describe()}", flush=True)
        elif name == "/unsteer":
            self.strengths = {}
            print("steering: none", flush=True)
        elif name == "/guard":
            rule = line.strip()[len(name) :].strip()
            if rule:
                self._set_guard(rule)
            shown = json.dumps(self.guard.to_dict()) if self.guard else "none"
            print(f"guard: {shown}", flush=True)
        elif name == "/unguard":
            self.guard = None
            print("guard: none", flush=True)
        elif name == "/top":
            if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
                raise EmolensError("usage: /top N (a positive whole number)")
            self.top = int(rest[0])
            print(f"showing the top {self.top} emotions", flush=True)
        elif name == "/reset":
            self._reset()
            print("conversation cleared", flush=True)
        else:
            print(HELP, flush=True)
        return True

    def say(self, text: str) -> None:
        """Send a user message, stream the reply (under the guard, if any) and print its
        mean readout."""
        import torch

        from emolens.chat import render
        from emolens.generation import Decoder
        from emolens.guard import Watch, act, reference_scale
        from emolens.readout import score, top_emotions

        self.messages.append({"role": "user", "content": text})
        pieces, scores, fired = [], [], []
        try:
            steering = self._vector(self.strengths) if self.strengths else None
            watch = extra = None
            if self.guard is not None:
                scale = reference_scale(self.lm, self.bank, self.layer, self.args.variant)
                index = self.bank.emotion_index(self.guard.emotion)
                watch = Watch(self.guard, float(scale[index]))
                extra = self.guard.steering(self.bank, self.layer, variant=self.args.variant,
                                            allow_strong=self.args.allow_strong)  # fmt: skip
            decoder = Decoder(self.lm, [self.layer])
            prompt = render(self.lm, self.messages, add_generation_prompt=True).ids
            decoder.add(0, prompt, self.sampling, steering, self.args.positions)
            print("model> ", end="", flush=True)
            while decoder.busy:
                for step in decoder.step():
                    print(step.text, end="", flush=True)
                    pieces.append(step.text)
                    projection = score(step.residuals[self.layer], self.bank, self.layer,
                                       self.args.variant).cpu()  # fmt: skip
                    scores.append(projection)
                    event = watch.push(float(projection[index])) if watch is not None else None
                    if event is not None:
                        fired.append(event)
                        if step.finish is None:
                            act(event, decoder, 0, steering, self.args.positions, extra)
        except BaseException:
            self.messages.pop()
            print()
            raise
        print()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        for event in fired:
            print(f"    [{event.describe()}]", flush=True)
        if not scores:
            print("    (empty reply)", flush=True)
            return
        mean = torch.stack(scores).mean(0)
        shown = "  ".join(
            f"{name} {value:+.2f}"
            for name, value in top_emotions(mean, self.bank.emotions, self.top)
        )
        note = f"; includes steering {self._describe()}" if self.strengths else ""
        print(f"    [{shown}]  mean over the reply, layer {self.layer}{note}", flush=True)

    def _set_guard(self, rule: str) -> None:
        from emolens.guard import Guard

        self.guard = Guard.parse(rule, self.bank.emotions, self.args.allow_strong)

    def _vector(self, strengths: dict[str, float]) -> SteeringVector:
        return self.bank.steering(strengths, self.layer, variant=self.args.variant,
                                  allow_strong=self.args.allow_strong)  # fmt: skip

    def _describe(self) -> str:
        if not self.strengths:
            return "none"
        return ", ".join(f"{name}={value:+g}" for name, value in self.strengths.items())
