"""`emolens info`: what emolens sees in a model."""

from __future__ import annotations

import argparse
import json

from emolens.cli._common import add_model_option, load_model_from


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="describe a model: depth, width, fingerprint")
    add_model_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    info = load_model_from(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
