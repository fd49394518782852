"""`emolens report`: validate a bank; report.json, PNG figures and one self-contained HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from emolens.cli._common import add_bank_option, add_model_option, load_model_from


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="validate a bank: accuracy, geometry, baseline, scenarios, intensity, steering, "
        "cross-genre transfer, axes",
        description="Evaluate a bank on its model and write DIR/report.json, PNG figures and "
        "DIR/report.html (self-contained, readable offline).",
    )
    add_model_option(parser)
    add_bank_option(parser)
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: report/ beside the bank)",
    )
    parser.add_argument(
        "--norms", default=None, metavar="CSV", help="human ratings: word,valence,arousal"
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="analysis layer (default: the bank's)"
    )
    parser.add_argument(
        "--heldout",
        default=None,
        metavar="PATH",
        help="heldout.safetensors (default: beside the bank)",
    )
    parser.add_argument("--no-steering", action="store_true", help="skip the steering section")
    parser.add_argument(
        "--no-transfer", action="store_true", help="skip the cross-genre transfer section"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from emolens.bank import default_bank_path
    from emolens.report import SteeringSettings, headline_text, write_report

    lm = load_model_from(args)
    bank_path = Path(args.bank) if args.bank else default_bank_path(lm.fingerprint)
    out = Path(args.out) if args.out else bank_path.parent / "report"
    report = write_report(
        lm,
        bank_path,
        out,
        heldout=args.heldout,
        norms=args.norms,
        steering=None if args.no_steering else SteeringSettings(),
        transfer=not args.no_transfer,
        progress=not args.quiet,
        layer=args.layer,
    )
    print(headline_text(report))
    print(f"report: {out / 'report.html'}")
