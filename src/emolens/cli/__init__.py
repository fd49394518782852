"""`emolens ...`: one subcommand per module in this package, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from emolens.errors import EmolensError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emolens",
        description="Find, read and steer emotion representations in language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("emolens: %(message)s"))
    logger = logging.getLogger("emolens")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logger.propagate = False
    try:
        return int(args.run(args) or 0)
    except EmolensError as error:
        print(f"emolens: error: {error}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as error:  # files the user named: unreadable, unwritable
        print(f"emolens: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emolens: interrupted", file=sys.stderr)
        return 130
