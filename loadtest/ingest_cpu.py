"""Engine CPU per ingested event, without gRPC: ``python -m loadtest.ingest_cpu --events 20000``.

Builds the engine core (``engine.app.build_engine``) on a private redis-server, gives the recipients
preferences, registers the parcels (untimed), then applies the ingest benchmark's batches straight to
the ``Ingestor`` with ``STREAMS`` batches in flight, and prints this process's CPU time per event
(``time.process_time``: the engine's own work, not Redis's nor the clients' encoding). Events are
built and decoded before the clock starts, as a gRPC server would hand them over, and the collector
is set as an engine worker sets it (``common.collector``). Beside it, the
redis-server's own CPU per event (its ``INFO cpu``): what the Lua scripts cost.

``--callgrind`` counts the engine's instructions per event instead (a child under valgrind, the
measured part only): slow, but the figure does not move with the load of the machine.
``--redis-callgrind`` counts the redis-server's instead (it runs under valgrind, the engine does not):
what the scripts cost Redis, for comparing two versions of them.

``--telemetry compare`` alternates runs with tracing and metrics off (the default: OpenTelemetry's
no-op) and on (the SDK recording every span and metric into memory): what the hot path pays for them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from relais.v1 import parcel_pb2, tracking_pb2

from common.clock import SystemClock
from common.collector import ENGINE_YOUNG_THRESHOLD, tune_collector
from common.redis_client import connect
from common.redis_server import EmbeddedRedis
from common.settings import Settings
from common.telemetry import Telemetry, noop_telemetry, setup_telemetry
from engine.app import build_engine
from engine.ingest import Ingestor
from engine.parcel_service import ParcelServicer
from loadtest.bench import STREAMS, make_groups
from loadtest.callgrind import run_module, total_instructions
from loadtest.callgrind import wrapper as callgrind_wrapper
from loadtest.journeys import promised_date, registrations
from loadtest.meter import metered
from loadtest.recipients import _into_redis

RECIPIENTS = 2000
REGISTER_CHUNK = 2000


async def _stream(ingestor: Ingestor, batches: Sequence[tracking_pb2.EventBatch]) -> int:
    accepted = 0
    for batch in batches:
        accepted += (await ingestor.apply(batch)).accepted
    return accepted


def recording_telemetry(settings: Settings) -> Telemetry:
    """Tracing and metrics on, exported to memory (the SDK's whole recording cost, no network)."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return setup_telemetry(
        settings, span_exporter=InMemorySpanExporter(), metric_reader=InMemoryMetricReader()
    )


async def measure(
    url: str,
    events: int,
    shards: int,
    prefix: str,
    *,
    profile: str = "",
    telemetry: bool = False,
    instrumented: Sequence[int] = (),
) -> tuple[float, float, int]:
    """(engine CPU seconds, redis-server CPU seconds, accepted events) for ingesting ``events`` events."""
    redis = connect(url)
    settings = Settings(shards=shards)
    recording = recording_telemetry(settings) if telemetry else noop_telemetry()
    try:
        clock = SystemClock()
        engine = build_engine(settings, redis, clock, recording.metrics, recording.tracer)
        await _into_redis(redis, shards, RECIPIENTS)
        now_ms = clock.now_ms()
        groups = make_groups(prefix, events, RECIPIENTS)
        journeys = [j for g in groups for j in g.journeys]
        servicer = ParcelServicer(engine.store, clock)
        promised = promised_date(now_ms)
        for i in range(0, len(journeys), REGISTER_CHUNK):
            request = registrations(journeys[i : i + REGISTER_CHUNK], promised)
            reply: parcel_pb2.RegisterParcelsResponse = await servicer.RegisterParcels(request, None)  # type: ignore[arg-type]
            if reply.rejected:
                raise RuntimeError(f"{len(reply.rejected)} registrations rejected")
        # Groups dealt round-robin over the streams, each group's stages in order (as the benchmark).
        streams: list[list[tracking_pb2.EventBatch]] = [[] for _ in range(STREAMS)]
        seq = 0
        for n, group in enumerate(groups):
            while not group.done:
                seq += 1
                streams[n % STREAMS].append(group.next_batch(seq, now_ms))
        tune_collector(ENGINE_YOUNG_THRESHOLD)  # as an engine worker does once it serves
        async with metered(redis, profile=profile, instrumented=instrumented, top=60) as cost:
            accepted = sum(await asyncio.gather(*(_stream(engine.ingestor, s) for s in streams)))
        return cost.cpu_s, cost.redis_s, accepted
    finally:
        recording.shutdown()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1, help="measurements, each on fresh parcels")
    parser.add_argument(
        "--profile", choices=("self", "cum"), default="", help="print cProfile's top functions (slower)"
    )
    parser.add_argument(
        "--telemetry",
        choices=("off", "on", "compare"),
        default="off",
        help="tracing and metrics off, on (recorded in memory), or alternating run by run",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count the engine's instructions per event under valgrind instead (slow, but not blurred "
        "by a busy machine)",
    )
    parser.add_argument(
        "--redis-callgrind",
        action="store_true",
        help="count the redis-server's instructions per event under valgrind (what the scripts cost it)",
    )
    parser.add_argument("--instrumented", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind:
        for run in range(args.runs):
            print(f"run {run}: {instructions_per_event(args.events, args.shards):,.0f} instructions/event")
        return
    if args.redis_callgrind:
        for run in range(args.runs):
            per_event = redis_instructions_per_event(args.events, args.shards, f"RCG{run}")
            print(f"run {run}: redis-server {per_event:,.0f} instructions/event")
        return
    server = EmbeddedRedis()
    url = server.start()
    try:
        for run in range(args.runs):
            prefix = f"CPU{run}"
            telemetry = args.telemetry == "on" or (args.telemetry == "compare" and run % 2 == 1)
            run_cpu = measure(
                url,
                args.events,
                args.shards,
                prefix,
                profile=args.profile,
                telemetry=telemetry,
                instrumented=(os.getpid(),) if args.instrumented else (),
            )
            cpu_s, redis_s, accepted = asyncio.run(run_cpu)
            per_event_us = cpu_s / max(accepted, 1) * 1e6
            redis_us = redis_s / max(accepted, 1) * 1e6
            print(
                f"run {run} (telemetry {'on' if telemetry else 'off'}): {accepted} events applied, "
                f"{per_event_us:.1f} µs CPU/event, {accepted / cpu_s:,.0f} events per CPU-second; "
                f"redis-server {redis_us:.1f} µs CPU/event"
            )
    finally:
        server.stop()


def instructions_per_event(events: int, shards: int) -> float:
    """One run in a child under callgrind, instrumented around the measured part only."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        args = ["--events", str(events), "--shards", str(shards), "--instrumented"]
        stdout = run_module("loadtest.ingest_cpu", args, out)
        accepted = int(stdout.split(" events applied")[0].rsplit(" ", 1)[1])
        return total_instructions(out) / max(accepted, 1)


def redis_instructions_per_event(events: int, shards: int, prefix: str) -> float:
    """One run against a redis-server under callgrind, instrumented around the measured part only."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        server = EmbeddedRedis(wrapper=callgrind_wrapper(out))
        url = server.start()
        try:
            _cpu_s, _redis_s, accepted = asyncio.run(
                measure(url, events, shards, prefix, instrumented=(server.pid,))
            )
        finally:
            server.stop()  # callgrind writes its counts as redis-server exits
        return total_instructions(out) / max(accepted, 1)


if __name__ == "__main__":
    main()
