"""The engine as the load test runs it: ``python -m loadtest.engine_proc [--no-scheduler]``.

The same composition as ``relais serve`` (``engine.app.build_engine`` handed to
``engine.server.start_server``, the scheduler's ``Dispatcher`` beside it), settings from the
environment, stopped by SIGTERM/SIGINT. It exists so the load test and the benchmarks do not depend on
what else the CLI wires (alert monitors, local sinks), and so ingest can be measured without the
scheduler (``--no-scheduler``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from common.clock import SystemClock
from common.redis_client import connect
from common.settings import Settings
from engine.app import build_engine
from engine.scheduler import Dispatcher
from engine.server import start_server


async def serve(*, scheduler: bool) -> None:
    settings = Settings.from_env()
    if settings.redis_url is None:
        raise SystemExit("engine_proc needs REDIS_URL")
    redis = connect(settings.redis_url)
    clock = SystemClock()
    engine = build_engine(settings, redis, clock)
    running = await start_server(settings, redis, register=engine.register)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dispatch = None
    if scheduler:
        dispatcher = Dispatcher(redis, clock, settings.shards)
        for name, handler in engine.timers.items():
            dispatcher.register_timer(name, handler)
        dispatch = asyncio.create_task(dispatcher.run(stop))
    try:
        await stop.wait()
    finally:
        await running.stop(2.0)
        if dispatch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-scheduler", action="store_true", help="serve gRPC only (ingest benchmark)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(scheduler=not args.no_scheduler))


if __name__ == "__main__":
    main()
