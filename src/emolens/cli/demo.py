"""`emolens demo`: the main job. Build the model's bank (cached), then write its report."""

from __future__ import annotations

import argparse
import time

from emolens.cli._common import add_model_option, load_model_from


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="build the emotion vectors of a model (cached) and write the report"
    )
    add_model_option(parser)
    parser.add_argument("--no-steering", action="store_true", help="skip the steering section")
    parser.add_argument(
        "--no-transfer", action="store_true", help="skip the cross-genre transfer section"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.bank import default_bank_path
    from emolens.build import build
    from emolens.cli.build import describe
    from emolens.report import SteeringSettings, headline_text, write_report

    start = time.perf_counter()
    lm = load_model_from(args)
    print(
        f"model: {lm.name}, {lm.depth} layers, width {lm.width} ({lm.load_seconds:.1f} s to load)"
    )
    bank = build(lm)
    print(describe(bank))
    out = default_bank_path(lm.fingerprint).parent / "report"
    steering = None if args.no_steering else SteeringSettings()
    report = write_report(lm, bank, out, steering=steering, transfer=not args.no_transfer)
    print(headline_text(report))
    print(f"report: {out / 'report.html'}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
