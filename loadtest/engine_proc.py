"""The engine as the load test runs it: ``python -m loadtest.engine_proc [--no-scheduler] [--workers N]``.

The same composition as ``relais serve`` (``engine.app.build_engine`` handed to
``engine.server.start_server``, the scheduler's ``Dispatcher`` beside it), settings from the
environment, stopped by SIGTERM/SIGINT. It exists so the load test and the benchmarks do not depend on
what else the CLI wires (alert monitors, local sinks), and so ingest can be measured without the
scheduler (``--no-scheduler``).

``--workers N`` runs N such processes on the one port, as ``relais serve --workers N`` does
(``cli.workers``): an operator runs about one per core. The scheduler runs in worker 0 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import signal
from pathlib import Path

from cli.workers import run_workers, shared_listen
from common.clock import SystemClock
from common.collector import ENGINE_YOUNG_THRESHOLD, tune_collector
from common.redis_client import connect
from common.settings import Settings
from common.telemetry import noop_telemetry
from engine.app import build_dispatcher, build_engine
from engine.server import start_server
from engine.stream_balance import WorkerPeers, peers_directory


async def serve(
    settings: Settings, *, scheduler: bool, index: int = 0, workers: int = 1, peers_dir: Path | None = None
) -> None:
    if settings.redis_url is None:
        raise SystemExit("engine_proc needs REDIS_URL")
    redis = connect(settings.redis_url)
    clock = SystemClock()
    peers = WorkerPeers.open(peers_dir, workers, index, settings, noop_telemetry())
    engine = build_engine(settings, redis, clock, relay=peers.relay if peers is not None else None)
    running = await start_server(settings, redis, register=engine.register, reuse_port=workers > 1)
    if peers is not None:
        await peers.attach(running, engine.ingestor)
    tune_collector(ENGINE_YOUNG_THRESHOLD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A worker ignores SIGINT: its supervisor passes the terminal's on as SIGTERM.
    for sig in (signal.SIGTERM,) if workers > 1 else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dispatch = None
    if scheduler and index == 0:
        dispatcher = build_dispatcher(settings, redis, clock, engine.timers)
        dispatch = asyncio.create_task(dispatcher.run(stop))
    try:
        await stop.wait()
    finally:
        await running.stop(2.0)
        if dispatch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
        await redis.aclose()


def run_worker(settings: Settings, scheduler: bool, workers: int, peers_dir: Path | None, index: int) -> None:
    import uvloop

    uvloop.run(serve(settings, scheduler=scheduler, index=index, workers=workers, peers_dir=peers_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-scheduler", action="store_true", help="serve gRPC only (ingest benchmark)")
    parser.add_argument(
        "--workers", type=int, help="processes sharing the port (default: RELAIS_ENGINE_WORKERS, 1)"
    )
    args = parser.parse_args()
    settings = Settings.from_env()
    workers = settings.engine.workers if args.workers is None else args.workers
    if workers > 1:
        shared = dataclasses.replace(settings, listen=shared_listen(settings.listen))
        with peers_directory(settings, workers) as peers_dir:
            worker = functools.partial(run_worker, shared, not args.no_scheduler, workers, peers_dir)
            code = run_workers(worker, workers, name="engine-proc")
        raise SystemExit(code)
    run_worker(settings, not args.no_scheduler, 1, None, 0)


if __name__ == "__main__":
    main()
