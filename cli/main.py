"""``relais serve | run``: start the engine (and, for ``run``, the whole embedded stack).

``serve`` needs nothing but Redis (``REDIS_URL``, or a private one it starts); ``run`` is what
``make run`` calls: private Redis, engine, scheduler, gateway and local sinks in one process, so a
newcomer sees what recipients would receive as files under ``var/sink``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cli.stack import engine_loops
from common import logs
from common.clock import SystemClock
from common.errors import RelaisError
from common.redis_client import connect
from common.redis_server import EmbeddedRedis
from common.settings import Settings
from common.telemetry import setup_telemetry
from engine.app import build_engine
from engine.auth import Principal, add_key, describe_listener
from engine.server import install_signal_handlers, start_server
from gateway import commands as gateway_commands

log = logging.getLogger("relais")


@contextlib.asynccontextmanager
async def redis_url(settings: Settings) -> AsyncIterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    embedded = EmbeddedRedis()
    url = await asyncio.to_thread(embedded.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(embedded.stop)


async def serve(settings: Settings, *, with_gateway: bool) -> None:
    async with redis_url(settings) as url:
        redis = connect(url)
        telemetry = setup_telemetry(settings)
        try:
            clock = SystemClock()
            engine = build_engine(settings, redis, clock, telemetry.metrics, telemetry.tracer)
            running = await start_server(settings, redis, register=engine.register, telemetry=telemetry)
            stopped = asyncio.Event()
            install_signal_handlers(running, stopped)
            where = "REDIS_URL" if settings.redis_url else f"embedded Redis at {url}"
            sec = settings.security
            log.info(
                "relais engine listening on %s (port %d), %s, gateway %s; %s",
                settings.listen,
                running.port,
                where,
                "on" if with_gateway else "off",
                describe_listener(sec.tls_cert, sec.tls_client_ca, sec.keys_file),
            )
            async with engine_loops(settings, redis, clock, engine, telemetry, with_gateway=with_gateway):
                await running.wait()
        finally:
            await redis.aclose()
            telemetry.shutdown()


def keys_add(principal: str, path: Path | None) -> int:
    """Print a new key once; only its hash is stored."""
    try:
        who = Principal.parse(principal)
        path = path or Settings.from_env().security.keys_file
    except (ValueError, RelaisError) as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 2
    if path is None:
        print("relais: give --file or set RELAIS_KEYS_FILE", file=sys.stderr)
        return 2
    print(add_key(path, who))
    print(f"relais: key for {who} added to {path}; it is shown only now", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relais", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="the engine's gRPC server and scheduler")
    sub.add_parser("run", help="everything, embedded: Redis, engine, scheduler, gateway, local sinks")
    keys_cmd = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    add = keys_cmd.add_parser(
        "add", help="print a new key for a principal and append its hash to the keys file"
    )
    add.add_argument("--principal", required=True, help="carrier:<code>, merchant:<id> or operator")
    add.add_argument("--file", type=Path, help="the keys file (default: RELAIS_KEYS_FILE)")
    gateway_commands.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return keys_add(args.principal, args.file)
    try:
        settings = Settings.from_env()
    except RelaisError as exc:
        print(f"relais: bad setting: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command in gateway_commands.COMMANDS:
        return gateway_commands.main(settings, args)
    try:
        import uvloop

        uvloop.run(serve(settings, with_gateway=args.command == "run" and settings.run_gateway))
    except RelaisError as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
