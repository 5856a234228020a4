"""``relais serve | run``: start the engine (and, for ``run``, the whole embedded stack).

``serve`` needs nothing but Redis (``REDIS_URL``, or a private one it starts); ``run`` is what
``make run`` calls: private Redis, engine, scheduler, gateway and local sinks in one process, so a
newcomer sees what recipients would receive as files under ``var/sink``.

``--workers N`` (``RELAIS_ENGINE_WORKERS``) runs N server processes on the one port (``cli.workers``).
The loops beside the server (scheduler and alert timers, digests, gauges, the gateway of ``run``) run
in worker 0 only: the scheduler's claims would be safe in all of them, but digests must go out once,
and the other workers' event loops stay free for calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cli.stack import engine_loops
from cli.workers import run_workers, shared_listen
from common import logs
from common.clock import SystemClock
from common.collector import ENGINE_YOUNG_THRESHOLD, tune_collector
from common.errors import RelaisError
from common.redis_client import connect
from common.redis_server import EmbeddedRedis
from common.settings import Settings
from common.telemetry import setup_telemetry
from engine.app import build_engine
from engine.auth import Principal, add_key, describe_listener
from engine.server import install_signal_handlers, start_server
from engine.stream_balance import WorkerPeers, peers_directory
from gateway import commands as gateway_commands

log = logging.getLogger("relais")


@contextlib.contextmanager
def resolved_redis(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """The settings with ``redis_url`` set — REDIS_URL, or a private Redis started here for the
    process and all its workers — and how the log names it (never the URL given: it may hold a
    password)."""
    if settings.redis_url:
        yield settings, "REDIS_URL"
        return
    with EmbeddedRedis() as embedded:
        yield dataclasses.replace(settings, redis_url=embedded.url), f"embedded Redis at {embedded.url}"


@dataclasses.dataclass(frozen=True)
class Worker:
    """Which of ``count`` server processes this is; a single one (the default) is worker 0 of 1."""

    index: int = 0
    count: int = 1
    # The workers' private directory (``engine.stream_balance``); None: streams stay where they land.
    peers_dir: Path | None = None

    @property
    def runs_loops(self) -> bool:
        return self.index == 0

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        # A supervised worker gets SIGTERM from its supervisor only (see cli.workers).
        return (signal.SIGTERM,) if self.count > 1 else (signal.SIGTERM, signal.SIGINT)


async def serve(
    settings: Settings, *, with_gateway: bool, where: str = "REDIS_URL", worker: Worker = Worker()
) -> None:
    """One server process; ``settings.redis_url`` is set (``resolved_redis``), ``where`` names it."""
    assert settings.redis_url is not None
    redis = connect(settings.redis_url)
    telemetry = setup_telemetry(settings)
    try:
        clock = SystemClock()
        peers = WorkerPeers.open(worker.peers_dir, worker.count, worker.index, settings, telemetry)
        relay = peers.relay if peers is not None else None
        engine = build_engine(settings, redis, clock, telemetry.metrics, telemetry.tracer, relay)
        running = await start_server(
            settings, redis, register=engine.register, telemetry=telemetry, reuse_port=worker.count > 1
        )
        if peers is not None:
            await peers.attach(running, engine.ingestor)
        install_signal_handlers(running, asyncio.Event(), worker.signals)
        tune_collector(ENGINE_YOUNG_THRESHOLD)
        sec = settings.security
        log.info(
            "relais engine listening on %s (port %d, worker %d of %d), %s, gateway %s; %s",
            settings.listen,
            running.port,
            worker.index + 1,
            worker.count,
            where,
            "on" if with_gateway and worker.runs_loops else "off",
            describe_listener(sec.tls_cert, sec.tls_client_ca, sec.keys_file),
        )
        if not worker.runs_loops:
            await running.wait()
            return
        async with engine_loops(settings, redis, clock, engine, telemetry, with_gateway=with_gateway):
            await running.wait()
    finally:
        await redis.aclose()
        telemetry.shutdown()


def run_worker(
    settings: Settings, with_gateway: bool, where: str, count: int, peers_dir: Path | None, index: int
) -> None:
    """One of ``count`` server processes (``cli.workers`` calls it in a fresh interpreter)."""
    logs.configure(settings.log_level)
    import uvloop

    worker = Worker(index, count, peers_dir)
    uvloop.run(serve(settings, with_gateway=with_gateway, where=where, worker=worker))


def serve_all(settings: Settings, *, with_gateway: bool, count: int) -> int:
    """``count`` server processes, or this one alone; the exit code."""
    with resolved_redis(settings) as (resolved, where):
        if count == 1:
            import uvloop

            uvloop.run(serve(resolved, with_gateway=with_gateway, where=where))
            return 0
        shared = dataclasses.replace(resolved, listen=shared_listen(settings.listen))
        log.info("relais engine: %d workers on %s", count, shared.listen)
        with peers_directory(settings, count) as peers_dir:
            main = functools.partial(run_worker, shared, with_gateway, where, count, peers_dir)
            return run_workers(main, count)


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
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port, about one per core (default: RELAIS_ENGINE_WORKERS, 1)",
    )
    sub.add_parser("serve", parents=[workers], help="the engine's gRPC server and scheduler")
    sub.add_parser(
        "run", parents=[workers], help="everything, embedded: Redis, engine, scheduler, gateway, local sinks"
    )
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
    count = settings.engine.workers if args.workers is None else args.workers
    if not 1 <= count <= 256:
        print(f"relais: --workers {count} is out of range (1 to 256)", file=sys.stderr)
        return 2
    try:
        return serve_all(settings, with_gateway=args.command == "run" and settings.run_gateway, count=count)
    except RelaisError as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
