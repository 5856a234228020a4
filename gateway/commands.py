"""``relais gateway`` and ``relais dlq list | replay``: the gateway's command-line surface.

``cli/main.py`` adds these subcommands with ``add_commands`` and hands them to ``main`` when
``args.command in COMMANDS``. All three need a shared Redis (``REDIS_URL``): a private one would
hold nothing to send or replay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from channels.errors import ChannelError
from common.clock import SystemClock, to_datetime
from common.errors import RelaisError
from common.redis_client import connect
from common.settings import Settings
from gateway.dlq import list_dead_letters, replay

log = logging.getLogger("relais.gateway")

COMMANDS = frozenset({"gateway", "dlq"})


def add_commands(sub: Any) -> None:
    """Add the gateway's subcommands to ``relais``' subparsers (``argparse._SubParsersAction``)."""
    sub.add_parser("gateway", help="the gateway alone: consume the outbox and send (needs REDIS_URL)")
    dlq = sub.add_parser("dlq", help="the dead-letter streams: notices out of retries")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_sub.add_parser("list", help="list dead letters, oldest first per shard")
    listing.add_argument("--count", type=int, default=100, help="at most this many per shard (default 100)")
    again = dlq_sub.add_parser("replay", help="put dead letters back into the due set, fresh")
    again.add_argument("--all", action="store_true", help="replay every dead letter")
    again.add_argument("ids", nargs="*", metavar="ID", help="ids as `relais dlq list` prints them")


def main(settings: Settings, args: argparse.Namespace) -> int:
    """Run a gateway subcommand; the exit status."""
    if not settings.redis_url:
        print(f"relais {args.command}: set REDIS_URL to the Redis the engine uses", file=sys.stderr)
        return 2
    if args.command == "gateway" and not settings.channels_named:
        # The built-in default ("file") writes recipients' messages to disk and counts them sent:
        # right for `relais run` on a laptop, a silent loss of every notice in production.
        print(
            "relais gateway: set RELAIS_CHANNELS to the channels to send by (e.g. email,fcm,sms) "
            "and each one's RELAIS_CHANNEL_<NAME>_<OPTION>; `relais run` uses local sinks",
            file=sys.stderr,
        )
        return 2
    if args.command == "dlq" and args.dlq_command == "replay" and args.all == bool(args.ids):
        print("relais dlq replay: give either --all or one or more IDs", file=sys.stderr)
        return 2
    try:
        import uvloop

        return uvloop.run(_run(settings, args))
    except (RelaisError, ChannelError, RedisError, ValueError) as exc:
        print(f"relais {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    assert settings.redis_url is not None
    redis = connect(settings.redis_url)
    try:
        if args.command == "gateway":
            await serve_gateway(settings, redis)
            return 0
        if args.dlq_command == "list":
            return await _list(settings, redis, args.count)
        return await _replay(settings, redis, None if args.all else args.ids)
    finally:
        await redis.aclose()


async def serve_gateway(settings: Settings, redis: Any) -> None:
    """The gateway with the configured channels until SIGTERM or SIGINT."""
    from common.telemetry import setup_telemetry
    from gateway.worker import run_configured_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    telemetry = setup_telemetry(settings)
    try:
        await run_configured_gateway(settings, redis, SystemClock(), stop, telemetry=telemetry)
    finally:
        telemetry.shutdown()
    log.info("relais gateway stopped")


async def _list(settings: Settings, redis: Any, count: int) -> int:
    letters = await list_dead_letters(redis, settings.shards, count=count)
    for letter in letters:
        notice = letter.notice
        when = to_datetime(letter.at_ms).isoformat(timespec="seconds")
        fields = (letter.id, when, notice.notice_id, f"v{notice.version}", f"attempt {notice.attempt}")
        print("\t".join((*fields, letter.reason)))
    print(f"{len(letters)} dead letter(s)", file=sys.stderr)
    return 0


async def _replay(settings: Settings, redis: Any, ids: Sequence[str] | None) -> int:
    result = await replay(redis, settings.shards, SystemClock(), ids)
    print(f"replayed {result.replayed}, superseded {result.superseded}, missing {len(result.missing)}")
    for missing in result.missing:
        print(f"not found: {missing}", file=sys.stderr)
    return 1 if result.missing else 0
