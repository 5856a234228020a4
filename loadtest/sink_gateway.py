"""A gateway process whose only channel is the counting sink: ``python -m loadtest.sink_gateway``.

The real gateway (``gateway.worker.run_gateway``) with the real Redis and settings from the
environment, but the counting channel under the catch-all name ``null``, so every provider kind is
routed to it and every send is written down for the exactly-once check. It stops on SIGTERM or
SIGINT, finishing the batch in hand, and closes the channel (which flushes its file).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from common.clock import SystemClock
from common.redis_client import connect
from common.settings import Settings
from gateway.worker import run_gateway
from loadtest.counting_channel import CountingChannel

CATCH_ALL_NAME = "null"


async def serve(directory: Path) -> None:
    settings = Settings.from_env()
    if settings.redis_url is None:
        raise SystemExit("sink_gateway needs REDIS_URL")
    redis = connect(settings.redis_url)
    channel = CountingChannel(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_gateway(settings, redis, SystemClock(), {CATCH_ALL_NAME: channel}, stop)
    finally:
        await channel.aclose()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="where the counting channel writes")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.dir))


if __name__ == "__main__":
    main()
