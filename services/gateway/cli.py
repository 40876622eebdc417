"""`revkernel gateway`."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli_types import port_number, positive_int
from shared.settings import Settings


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: every `revkernel` command builds the whole parser, and the gateway's imports
    # (aiohttp, aio-pika, ...) would add a third of a second to each admin command.
    from services.gateway.main import run_gateways

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["gateway_host"] = args.host
    if args.port is not None:
        overrides["gateway_port"] = args.port
    return run_gateways(settings.with_overrides(**overrides), args.workers)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("gateway", help="run the HTTP gateway")
    p.add_argument("--host")
    p.add_argument("--port", type=port_number)
    p.add_argument(
        "--workers", type=positive_int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    p.set_defaults(handler=cmd_gateway)
