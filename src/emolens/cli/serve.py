"""`emolens serve`: an OpenAI-compatible server with live emotion readouts, per-request
steering, guards and a browser dashboard."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

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

log = logging.getLogger("emolens")
KEY_VARIABLE = "EMOLENS_API_KEY"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with readouts and a dashboard",
        description="An OpenAI-compatible server (POST /v1/chat/completions, /v1/completions, "
        "GET /v1/models, /health) whose requests may read emotions, steer and set a guard "
        'under "emolens" in the body; the dashboard is at /. Needs `pip install '
        "'emolens[serve]'`. --layer is where tokens are read and where steering goes unless a "
        "request names layers; the sampling options are defaults for requests that leave "
        "them out.",
    )
    add_model_option(parser)
    add_bank_option(parser)
    add_steering_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${KEY_VARIABLE} if set)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                        help="most tokens a request may generate (1024)")  # fmt: skip
    limits.add_argument("--max-messages", type=int, default=64, metavar="N",
                        help="most messages in a chat request (64)")  # fmt: skip
    limits.add_argument("--max-body", type=int, default=1_000_000, metavar="BYTES",
                        help="largest request body (1000000)")  # fmt: skip
    limits.add_argument("--max-concurrent", type=int, default=32, metavar="N",
                        help="requests decoding or waiting at once (32)")  # fmt: skip
    add_sampling_options(parser, max_new_tokens=256)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from emolens.serve import Defaults, Limits, Settings, create_app
    except ImportError as error:
        raise EmolensError(
            f"emolens serve needs its extra ({error.name} is missing): pip install 'emolens[serve]'"
        ) from None
    for name in ("max_tokens", "max_messages", "max_body", "max_concurrent"):
        if getattr(args, name) < 1:
            raise EmolensError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise EmolensError(f"--port must be from 0 to 65535, not {args.port}")
    api_key = args.api_key or os.environ.get(KEY_VARIABLE) or None
    if not _loopback(args.host) and api_key is None:
        log.warning("binding to %s without an API key: anyone who can reach it can use it",
                    args.host)  # fmt: skip
    lm = load_model_from(args)
    bank = load_bank_for(args, lm)
    settings = Settings(
        layer=args.layer,
        variant=args.variant,
        api_key=api_key,
        limits=Limits(args.max_tokens, args.max_messages, args.max_body, args.max_concurrent),
        defaults=Defaults(sampling_from(args), args.positions, args.allow_strong),
    )
    log.info("calibrating the readout scale on the reference set ...")
    app = create_app(lm, bank, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log.info("serving %s on http://%s:%d (dashboard at /)", lm.name, shown, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
