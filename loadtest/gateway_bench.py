"""The gateway's cost per notice and its throughput: ``python -m loadtest.gateway_bench``.

``cpu`` (the default) fills a private Redis the way the benchmark does — the engine core ingests the
benchmark's journeys (``loadtest.ingest_cpu``), the real ``Dispatcher`` claims every due notice into
the outboxes — then one in-process ``Gateway`` drains them batch after batch into the counting sink,
and prints this process's CPU time per notice (``time.process_time``: the gateway's own Python, not
Redis's), the Redis round trips per batch and the commands Redis ran per notice (``INFO
commandstats``: those inside the Lua scripts included). ``--profile self|cum`` adds cProfile's top functions;
``--callgrind`` counts instructions per notice instead (valgrind), which a busy machine does not blur.

``drain_with_gateways`` is ``make bench``'s gateway section: what an operator runs, one gateway
process per core (``relais gateway``), here each the real ``Gateway`` loop with the counting sink
under the catch-all name ``null``. The processes start, load everything and wait at a gate; then they
drain the outboxes together, and the figure is the notices sent over the span from the gate opening to
the last batch settled, with the number of processes beside it (and the span from the first send to
the last, the in-process benchmark's before, printed for comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from common.clock import SystemClock
from common.redis_client import connect
from common.redis_server import EmbeddedRedis
from common.settings import GatewaySettings, Settings
from loadtest.callgrind import run_module, total_instructions
from loadtest.counting_channel import CountingChannel
from loadtest.meter import metered, redis_cpu_s
from loadtest.redis_stats import CommandStats, RoundTrips, command_stats
from loadtest.stack import GENEROUS_LIMITS

DRAIN_TIMEOUT_S = 600.0

if TYPE_CHECKING:
    from gateway.render import Renderer


def gateway_settings(redis_url: str, shards: int, *, limits: bool) -> Settings:
    """The benchmark's gateway settings: limits on far above the load (their cost, not their
    throttling), or off."""
    env = {**GENEROUS_LIMITS, "RELAIS_SHARDS": str(shards), "REDIS_URL": redis_url}
    base = Settings.from_env(env)
    gateway = GatewaySettings.from_env({**env, "RELAIS_GATEWAY_LIMITS_ENABLED": str(limits).lower()})
    return dataclasses.replace(base, gateway=gateway)


async def fill_outbox(redis_url: str, shards: int, events: int, prefix: str) -> int:
    """Ingest ``events`` of the benchmark's journeys through the engine core and claim every notice
    due into the outboxes: returns how many were claimed."""
    from loadtest.bench import claim_all
    from loadtest.ingest_cpu import measure

    await measure(redis_url, events, shards, prefix)
    claimed, _, _, _ = await claim_all(redis_url, shards, 10**9)
    return claimed


def counting_connect(redis_url: str, trips: RoundTrips) -> Redis:
    """The production client (``common.redis_client.connect``: hiredis packing, scripts checked once)
    whose every socket write adds one to ``trips``."""
    redis = connect(redis_url)
    pool = redis.connection_pool
    packing: Any = pool.connection_class

    class Counting(packing):  # type: ignore[misc]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            trips.count += 1
            await super().send_packed_command(command, check_health)

    pool.connection_class = Counting
    return redis


@dataclasses.dataclass(frozen=True, slots=True)
class CpuFigures:
    sent: int
    batches: int
    cpu_s: float
    redis_cpu_s: float
    round_trips: int
    # What Redis ran while the gateway drained (the meter's own INFO calls left out).
    commands: CommandStats


async def drain_cpu(
    redis_url: str,
    shards: int,
    sink: Path,
    renderer: Renderer | None,
    *,
    limits: bool,
    profile: str = "",
    callgrind: bool = False,
) -> CpuFigures:
    """One gateway drains the outboxes, one batch at a time: its CPU time, Redis's, and round trips.
    Under callgrind the first batch (templates compiled, locale data loaded) is left out."""
    from common.collector import GATEWAY_YOUNG_THRESHOLD, tune_collector
    from gateway.worker import Gateway

    trips = RoundTrips()
    redis = counting_connect(redis_url, trips)
    channel = CountingChannel(sink)
    settings = gateway_settings(redis_url, shards, limits=limits)
    gateway = Gateway(settings, redis, SystemClock(), {"null": channel}, renderer=renderer)
    try:
        await gateway.start()
        tune_collector(GATEWAY_YOUNG_THRESHOLD)  # as Gateway.run does after its start
        if callgrind:
            await gateway.process(await gateway.outbox.read(block=False))
        commands_before = await command_stats(redis)
        trips.count = 0
        batches = 0
        warm_sent = channel.sent
        async with metered(
            redis, profile=profile, instrumented=(os.getpid(),) if callgrind else (), top=45
        ) as cost:
            while entries := await gateway.outbox.read(block=False):
                await gateway.process(entries)
                batches += 1
        round_trips = trips.count
        ran = (await command_stats(redis)).minus(commands_before).calls
        commands = CommandStats({name: count for name, count in ran.items() if name != "info"})
        return CpuFigures(channel.sent - warm_sent, batches, cost.cpu_s, cost.redis_s, round_trips, commands)
    finally:
        await channel.aclose()
        await redis.aclose()


async def _flush(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


# Commands run fewer times than this per notice (once a batch or a shard) are left out of the detail.
COMMAND_DETAIL_MIN = 0.01


def _report(label: str, claimed: int, figures: CpuFigures) -> None:
    sent = max(figures.sent, 1)
    calls = figures.commands.calls
    detail = ", ".join(
        f"{name} {count / sent:.2f}"
        for name, count in sorted(calls.items(), key=lambda item: -item[1])
        if count / sent >= COMMAND_DETAIL_MIN
    )
    print(
        f"{label}: {claimed} claimed, {figures.sent} sent in {figures.batches} batches; CPU per notice: "
        f"gateway {figures.cpu_s / sent * 1e6:.1f} µs, Redis {figures.redis_cpu_s / sent * 1e6:.1f} µs; "
        f"{figures.round_trips / max(figures.batches, 1):.1f} round trips per batch; "
        f"{figures.commands.total / sent:.2f} Redis commands per notice ({detail})",
        flush=True,
    )


async def measure_cpu(redis_url: str, shards: int, events: int, runs: int, *, profile: str) -> None:
    """A warm-up run (templates compiled, locales loaded: once per process), then ``runs`` runs
    alternating limits on and off, each on a fresh outbox; one line per run."""
    from gateway.render import Renderer

    renderer = Renderer()
    for run in range(runs + 1):
        limits = run % 2 == 0
        await _flush(redis_url)
        claimed = await fill_outbox(redis_url, shards, events, f"GW{run}")
        with tempfile.TemporaryDirectory() as sink:
            figures = await drain_cpu(
                redis_url, shards, Path(sink), renderer, limits=limits, profile=profile if run else ""
            )
        label = "warm-up" if run == 0 else f"run {run}"
        _report(f"{label} (limits {'on' if limits else 'off'})", claimed, figures)


async def measure_instructions(redis_url: str, shards: int, events: int, runs: int) -> None:
    """``runs`` runs alternating limits on and off: each drain in a child process under callgrind
    (instructions are what a busy machine does not blur); one line per run."""
    for run in range(runs):
        limits = run % 2 == 0
        await _flush(redis_url)
        claimed = await fill_outbox(redis_url, shards, events, f"GI{run}")
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "callgrind.out"
            args = ["--drain", redis_url, "--shards", str(shards), *([] if limits else ["--limits-off"])]
            stdout = await asyncio.to_thread(run_module, "loadtest.gateway_bench", args, out)
            sent = int(stdout.split()[-1])
            instructions = total_instructions(out)
        if not sent:
            print(f"run {run + 1}: all {claimed} notices fit in the first batch; ingest more events")
            continue
        print(
            f"run {run + 1} (limits {'on' if limits else 'off'}): {claimed} claimed, {sent} measured "
            f"(after the first batch): {instructions / sent:,.0f} instructions per notice",
            flush=True,
        )


async def drain_child(redis_url: str, shards: int, *, limits: bool) -> None:
    """The child of ``measure_instructions``: prints how many notices were measured."""
    with tempfile.TemporaryDirectory() as sink:
        figures = await drain_cpu(redis_url, shards, Path(sink), None, limits=limits, callgrind=True)
    print(figures.sent)


# --- N gateway processes: make bench's section 3 -------------------------------------------------------

READY = b"ready"
DRAIN_POLL_S = 0.01


@dataclasses.dataclass(frozen=True, slots=True)
class Drained:
    sent: int
    # From the gate opening to the outbox found drained (every batch settled): the benchmark's span.
    seconds: float
    # From the first send to the last across the processes (the in-process benchmark's span before):
    # it leaves out the first batches' work before their sends and the last ones' settling, which
    # with batches of up to 4,096 notices, several in flight per process, is most of the work.
    first_to_last_send_s: float
    processes: int


def gateway_processes() -> int:
    """One per core, as an operator would run them (``RELAIS_BENCH_GATEWAYS`` to choose)."""
    return int(os.environ.get("RELAIS_BENCH_GATEWAYS", "0")) or os.cpu_count() or 1


async def _spawn_gateway(
    redis_url: str, shards: int, sink: Path, *, limits: bool
) -> asyncio.subprocess.Process:
    args = ["--serve", str(sink), "--redis-url", redis_url, "--shards", str(shards)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.gateway_bench",
        *args,
        *([] if limits else ["--limits-off"]),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if line.strip() != READY:
        raise RuntimeError(f"gateway process {proc.pid} did not start (exit {await proc.wait()})")
    return proc


async def _wait_drained(redis_url: str, shards: int, procs: Sequence[asyncio.subprocess.Process]) -> None:
    from loadtest.audit import backlog

    redis = connect(redis_url)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < DRAIN_TIMEOUT_S:
            await asyncio.sleep(DRAIN_POLL_S)
            if any(proc.returncode is not None for proc in procs):
                raise RuntimeError("a gateway process exited before the outbox was drained")
            if (await backlog(redis, shards, time.time_ns() // 1_000_000)).outbox_undelivered == 0:
                return
        raise RuntimeError(f"the outbox was not drained in {DRAIN_TIMEOUT_S:.0f} s")
    finally:
        await redis.aclose()


async def drain_with_gateways(
    redis_url: str, shards: int, sink: Path, *, limits: bool, processes: int | None = None
) -> Drained:
    """``processes`` gateway processes (default ``gateway_processes()``) drain the outboxes together
    into counting sinks under ``sink``: notices sent, seconds from the gate opening to the last batch
    settled, processes. Their start-up (imports, templates, scripts) is before the gate, not counted."""
    from loadtest.counting_channel import read_deliveries

    count = processes or gateway_processes()
    procs = list(
        await asyncio.gather(*(_spawn_gateway(redis_url, shards, sink, limits=limits) for _ in range(count)))
    )
    redis = connect(redis_url)
    try:
        redis_cpu_before = await redis_cpu_s(redis)
        opened = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        await _wait_drained(redis_url, shards, procs)
        gate_to_drained_s = time.perf_counter() - opened
        redis_cpu = await redis_cpu_s(redis) - redis_cpu_before
    finally:
        await redis.aclose()
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in procs))
    gateways_cpu = sum([float(await proc.stdout.read()) for proc in procs if proc.stdout is not None])
    deliveries = read_deliveries(sink)
    if deliveries.duplicated:
        raise RuntimeError(f"{len(deliveries.duplicated)} idempotency keys sent more than once")
    times = deliveries.first_sent_ms.values()
    span_s = (max(times) - min(times)) / 1000 if len(times) > 1 else 0.0
    sent = deliveries.total
    print(
        f"  gateway: {count} processes, {sent} notices: {sent / gate_to_drained_s:,.0f}/s from the gate "
        f"to all settled ({gate_to_drained_s:.2f} s), {sent / max(span_s, 1e-3):,.0f}/s from the first "
        f"send to the last ({span_s:.2f} s); CPU per notice: gateways {gateways_cpu / sent * 1e6:.1f} µs, "
        f"Redis {redis_cpu / sent * 1e6:.1f} µs; load average {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    return Drained(sent, gate_to_drained_s, span_s, count)


async def serve_gated(sink: Path, redis_url: str, shards: int, *, limits: bool) -> None:
    """One gateway process of ``drain_with_gateways``: starts, says it is ready, waits for the gate
    (a line on stdin), then runs the real loop until SIGTERM."""
    from gateway.render import Renderer
    from gateway.worker import Gateway

    renderer = Renderer()
    renderer.warm()  # as Gateway.run does before its first batch, here before the gate
    redis = connect(redis_url)
    channel = CountingChannel(sink)
    settings = gateway_settings(redis_url, shards, limits=limits)
    gateway = Gateway(settings, redis, SystemClock(), {"null": channel}, renderer=renderer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        sys.stdout.buffer.write(READY + b"\n")
        sys.stdout.flush()
        await loop.run_in_executor(None, sys.stdin.readline)
        cpu_at_gate = time.process_time()
        await gateway.run(stop)
        # This process's CPU from the gate to the stop, for drain_with_gateways' CPU per notice.
        sys.stdout.buffer.write(f"{time.process_time() - cpu_at_gate}\n".encode())
        sys.stdout.flush()
    finally:
        await channel.aclose()
        await redis.aclose()


async def measure_throughput(redis_url: str, shards: int, events: int, processes: int | None) -> None:
    """Limits on, then off: each on a fresh outbox drained by ``drain_with_gateways``."""
    for limits in (True, False):
        await _flush(redis_url)
        await fill_outbox(redis_url, shards, events, f"GT{int(limits)}")
        with tempfile.TemporaryDirectory() as sink:
            drained = await drain_with_gateways(
                redis_url, shards, Path(sink), limits=limits, processes=processes
            )
        print(f"limits {'on' if limits else 'off'}: {drained}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000, help="tracking events ingested per run")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument(
        "--runs", type=int, default=2, help="runs after a warm-up, limits on and off by turns"
    )
    parser.add_argument("--profile", choices=("self", "cum"), default="", help="cProfile's top functions")
    parser.add_argument(
        "--callgrind", action="store_true", help="instructions per notice (valgrind) instead of CPU time"
    )
    parser.add_argument(
        "--throughput",
        type=int,
        metavar="PROCESSES",
        help="notices/s of this many gateway processes draining together (0: one per core)",
    )
    parser.add_argument("--drain", metavar="REDIS_URL", help=argparse.SUPPRESS)  # the callgrind child
    parser.add_argument("--limits-off", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="SINK_DIR", type=Path, help=argparse.SUPPRESS)  # a gated gateway
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        asyncio.run(drain_child(args.drain, args.shards, limits=not args.limits_off))
        return
    if args.serve:
        import uvloop

        uvloop.run(serve_gated(args.serve, args.redis_url, args.shards, limits=not args.limits_off))
        return
    server = EmbeddedRedis()
    url = server.start()
    try:
        if args.throughput is not None:
            asyncio.run(measure_throughput(url, args.shards, args.events, args.throughput or None))
        elif args.callgrind:
            asyncio.run(measure_instructions(url, args.shards, args.events, args.runs))
        else:
            asyncio.run(measure_cpu(url, args.shards, args.events, args.runs, profile=args.profile))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
