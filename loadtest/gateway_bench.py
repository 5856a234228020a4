"""The gateway's cost per notice and its throughput: ``python -m loadtest.gateway_bench``.

``cpu`` (the default) fills a private Redis the way the benchmark does — the engine core ingests the
benchmark's journeys (``loadtest.ingest_cpu``), the real ``Dispatcher`` claims every due notice into
the outboxes — then one in-process ``Gateway`` drains them batch after batch into the counting sink,
and prints this process's CPU time per notice (``time.process_time``: the gateway's own Python, not
Redis's) and the Redis round trips per batch. ``--profile self|cum`` adds cProfile's top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from common.clock import SystemClock
from common.redis_client import connect
from common.redis_server import EmbeddedRedis
from common.settings import GatewaySettings, Settings
from loadtest.counting_channel import CountingChannel
from loadtest.redis_stats import RoundTrips
from loadtest.stack import GENEROUS_LIMITS

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


async def redis_cpu_s(redis: Redis) -> float:
    info: dict[str, Any] = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _callgrind(switch: str) -> None:
    """Instrumentation on or off in this process when it runs under ``valgrind --tool=callgrind``."""
    subprocess.run(["callgrind_control", "-i", switch, str(os.getpid())], check=True, capture_output=True)


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
    from gateway.worker import Gateway

    trips = RoundTrips()
    redis = counting_connect(redis_url, trips)
    channel = CountingChannel(sink)
    settings = gateway_settings(redis_url, shards, limits=limits)
    gateway = Gateway(settings, redis, SystemClock(), {"null": channel}, renderer=renderer)
    profiler = cProfile.Profile() if profile else None
    try:
        await gateway.start()
        gc.freeze()  # as Gateway.run does after its start
        if callgrind:
            await gateway.process(await gateway.outbox.read(block=False))
            _callgrind("on")
        trips.count = 0
        batches = 0
        warm_sent = channel.sent
        redis_before = await redis_cpu_s(redis)
        started = time.process_time()
        if profiler is not None:
            profiler.enable()
        while entries := await gateway.outbox.read(block=False):
            await gateway.process(entries)
            batches += 1
        cpu_s = time.process_time() - started
        if callgrind:
            _callgrind("off")
        redis_s = await redis_cpu_s(redis) - redis_before
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative" if profile == "cum" else "tottime").print_stats(45)
        return CpuFigures(channel.sent - warm_sent, batches, cpu_s, redis_s, trips.count)
    finally:
        await channel.aclose()
        await redis.aclose()


async def _flush(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


def _report(label: str, claimed: int, figures: CpuFigures) -> None:
    sent = max(figures.sent, 1)
    print(
        f"{label}: {claimed} claimed, {figures.sent} sent in {figures.batches} batches; CPU per notice: "
        f"gateway {figures.cpu_s / sent * 1e6:.1f} µs, Redis {figures.redis_cpu_s / sent * 1e6:.1f} µs; "
        f"{figures.round_trips / max(figures.batches, 1):.1f} round trips per batch",
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


def _total_instructions(callgrind_out: Path) -> int:
    for line in callgrind_out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{callgrind_out}: no totals line")


async def measure_instructions(redis_url: str, shards: int, events: int, runs: int) -> None:
    """``runs`` runs alternating limits on and off: each drain in a child process under callgrind
    (instructions are what a busy machine does not blur); one line per run."""
    for run in range(runs):
        limits = run % 2 == 0
        await _flush(redis_url)
        claimed = await fill_outbox(redis_url, shards, events, f"GI{run}")
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "callgrind.out"
            child = [
                sys.executable,
                "-m",
                "loadtest.gateway_bench",
                "--drain",
                redis_url,
                "--shards",
                str(shards),
            ]
            valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
            limit_args = [] if limits else ["--limits-off"]
            proc = await asyncio.create_subprocess_exec(
                *valgrind,
                *child,
                *limit_args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            stdout, _ = await proc.communicate()
            sent = int(stdout.split()[-1])
            instructions = _total_instructions(out)
        print(
            f"run {run + 1} (limits {'on' if limits else 'off'}): {claimed} claimed, {sent} measured "
            f"(after the first batch): {instructions / max(sent, 1):,.0f} instructions per notice",
            flush=True,
        )


async def drain_child(redis_url: str, shards: int, *, limits: bool) -> None:
    """The child of ``measure_instructions``: prints how many notices were measured."""
    with tempfile.TemporaryDirectory() as sink:
        figures = await drain_cpu(redis_url, shards, Path(sink), None, limits=limits, callgrind=True)
    print(figures.sent)


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
    parser.add_argument("--drain", metavar="REDIS_URL", help=argparse.SUPPRESS)  # the callgrind child
    parser.add_argument("--limits-off", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        asyncio.run(drain_child(args.drain, args.shards, limits=not args.limits_off))
        return
    server = EmbeddedRedis()
    url = server.start()
    try:
        if args.callgrind:
            asyncio.run(measure_instructions(url, args.shards, args.events, args.runs))
        else:
            asyncio.run(measure_cpu(url, args.shards, args.events, args.runs, profile=args.profile))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
