"""``make bench``: each figure beside its baseline, measured in the same run on the same machine.

1. ingest — engine events/s over batched ``StreamEvents``, fully applied (acked), vs a bare
   ``grpc.aio`` echo server fed the very same bytes (``loadtest.echo_server``);
2. scheduler — notices claimed from ``due:{s}`` into the outbox per second (the real ``Dispatcher``
   on the notices the engine planned), vs arq's worker picking up deferred no-op jobs on the same
   Redis; Redis round trips and commands per notice; the claim rate with 1M notices pending;
3. gateway — notices/s through the real gateway into a counting sink, rate limits on vs off;
4. end to end — carrier events in, notices out of the sink, with the whole stack running;
5. memory — Redis bytes per tracked parcel with one pending notice; engine RSS after the events.

Beside them, the machine's speed before and after (``machine_loop_s``): this machine's CPU speed
moves by up to 3 times from one day to the next, and every figure above moves with it.

``--quick`` runs everything at a tenth of the size. Results go to ``loadtest/results/bench.json``;
a figure whose component cannot run is null with the reason under ``reasons``, never invented.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc

from common import keys
from common.clock import SystemClock
from common.redis_client import connect
from common.redis_server import free_port
from loadtest.arq_baseline import measure_arq
from loadtest.audit import backlog, percentile
from loadtest.counting_channel import read_deliveries
from loadtest.echo_server import write_views
from loadtest.get_parcel_latency import measure_in_process as measure_get_parcel
from loadtest.get_parcel_latency import processes_cpu_s, sample_parcel_ids, tree_cpu_s
from loadtest.ingest_client import Batch, plan_streams, stream_batches
from loadtest.journeys import (
    EventBudget,
    Group,
    Journey,
    JourneyFactory,
    Mix,
    Shape,
    promised_date,
    registrations,
)
from loadtest.recipients import set_up_recipients
from loadtest.redis_stats import RoundTrips, command_stats, counting_client, used_memory
from loadtest.stack import Stack, StackConfig
from loadtest.wire import encode_next

RESULTS = Path(__file__).parent / "results"
REGISTER_CHUNK = 5000
# Carriers connect many systems: 16 connections spread over the engine's workers (the kernel hashes
# each connection to one of them), 2 unacknowledged batches each: 16,000 events in flight.
STREAMS = 16
WINDOW = 2
PARCELS_PER_BATCH = 500
DRAIN_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Sizes:
    ingest_events: int
    claim_small: int
    claim_large_pending: int
    arq_jobs: int
    e2e_notices: int
    memory_parcels: int
    recipients: int


FULL = Sizes(
    ingest_events=1_000_000,
    claim_small=10_000,
    claim_large_pending=1_000_000,
    arq_jobs=10_000,
    e2e_notices=1_000_000,
    memory_parcels=100_000,
    recipients=20_000,
)
QUICK = Sizes(
    ingest_events=100_000,
    claim_small=10_000,
    claim_large_pending=100_000,
    arq_jobs=2_000,
    e2e_notices=100_000,
    memory_parcels=10_000,
    recipients=2_000,
)


@dataclass
class Results:
    figures: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def unavailable(self, names: list[str], reason: str) -> None:
        for name in names:
            self.figures.setdefault(name, None)
            self.reasons[name] = reason


async def section(results: Results, names: list[str], run: Callable[[], Awaitable[None]]) -> None:
    """Run one section; if it fails its figures are null with the reason (a component not landed)."""
    started = time.monotonic()
    try:
        await run()
    except Exception as exc:
        results.unavailable(
            [n for n in names if results.figures.get(n) is None], f"{type(exc).__name__}: {exc}"
        )
    print(f"  ({', '.join(names)}: {time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)


# --- workload ----------------------------------------------------------------------------------------


def make_groups(prefix: str, events: int, recipients: int, mix: Mix | None = None) -> list[Group]:
    factory = JourneyFactory(prefix=prefix, recipients=recipients, mix=mix or Mix())
    budget = EventBudget(events)
    groups: list[Group] = []
    while (group := budget.take_group(factory, PARCELS_PER_BATCH)) is not None:
        groups.append(group)
    return groups


async def register_all(target: str, journeys: list[Journey], now_ms: int) -> None:
    """Untimed set-up: the merchants register the parcels first, so events plan notices."""
    promised = promised_date(now_ms)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = parcel_pb2_grpc.ParcelServiceStub(channel)
        chunks = [journeys[i : i + REGISTER_CHUNK] for i in range(0, len(journeys), REGISTER_CHUNK)]
        sem = asyncio.Semaphore(4)

        async def one(chunk: list[Journey]) -> parcel_pb2.RegisterParcelsResponse:
            async with sem:
                return await stub.RegisterParcels(registrations(chunk, promised))

        replies = await asyncio.gather(*(one(c) for c in chunks))
    rejected = sum(len(r.rejected) for r in replies)
    if rejected:
        raise RuntimeError(f"{rejected} registrations rejected")


def spawn_echo(
    log_dir: Path, *, name: str = "echo", views: Path | None = None, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    """The echo services (``loadtest.echo_server``) in a process of their own: the framework's share."""
    port = free_port()
    log = (log_dir / f"{name}.log").open("wb")
    args = [sys.executable, "-m", "loadtest.echo_server", "--port", str(port), "--workers", str(workers)]
    if views is not None:
        args += ["--views", str(views)]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"127.0.0.1:{port}"


# --- 1. ingest, and what it leaves for 2. and 3. ---------------------------------------------------


async def bench_ingest(results: Results, sizes: Sizes, stack: Stack, run_dir: Path) -> None:
    now_ms = time.time_ns() // 1_000_000
    groups = make_groups("BI", sizes.ingest_events, sizes.recipients)
    journeys = [j for g in groups for j in g.journeys]
    streams = plan_streams(groups, STREAMS, now_ms)
    echo, echo_target = spawn_echo(run_dir)
    try:
        await asyncio.sleep(1.0)
        echo_result = await stream_batches(echo_target, streams, window=WINDOW)
    finally:
        echo.terminate()
        echo.wait()
    results.figures["echo_events_per_s"] = echo_result.events_per_s
    await register_all(stack.target, journeys, now_ms)
    # CPU seconds per side: what each event costs, so the events/s two cores allow can be read off
    # (2 / the sum), whatever else the machine did meanwhile.
    cpu_before = ingest_cpu_s(stack)
    workers_before = processes_cpu_s(stack.engine_pid())
    engine_result = await stream_batches(stack.target, streams, window=WINDOW)
    cpu = {side: spent - cpu_before[side] for side, spent in ingest_cpu_s(stack).items()}
    per_event = {
        side: s / engine_result.events * 1e6 if engine_result.events else None for side, s in cpu.items()
    }
    acks = list(engine_result.ack_ms)
    results.figures.update(
        {
            "ingest_events": engine_result.events,
            "ingest_events_per_s": engine_result.events_per_s,
            "ingest_rejected": engine_result.rejected,
            "ingest_ack_ms_p50": percentile(acks, 50),
            "ingest_ack_ms_p99": percentile(acks, 99),
            "ingest_vs_echo": engine_result.events_per_s / echo_result.events_per_s
            if echo_result.events_per_s
            else None,
            "engine_rss_bytes": stack.engine_rss_bytes(),
            "engine_rss_after_events": engine_result.events,
            "ingest_engine_cpu_us_per_event": per_event["engine"],
            "ingest_redis_cpu_us_per_event": per_event["redis"],
            "ingest_client_cpu_us_per_event": per_event["client"],
            "ingest_busiest_worker_cpu_share": busiest_share(stack, workers_before),
        }
    )


async def bench_ingest_one_connection(results: Results, sizes: Sizes, stack: Stack) -> None:
    """A fifth of the events, the same 16 streams all on one connection, as one gRPC channel sends
    them: the kernel hands that connection to one worker, and only the engine's stream balancing
    spreads the work (``--no-balance`` to see the run without it)."""
    now_ms = time.time_ns() // 1_000_000
    groups = make_groups("BC", sizes.ingest_events // 5, sizes.recipients)
    streams = plan_streams(groups, STREAMS, now_ms)
    await register_all(stack.target, [j for g in groups for j in g.journeys], now_ms)
    cpu_before = ingest_cpu_s(stack)
    workers_before = processes_cpu_s(stack.engine_pid())
    result = await stream_batches(stack.target, streams, window=WINDOW, connections=1)
    engine_s = ingest_cpu_s(stack)["engine"] - cpu_before["engine"]
    results.figures.update(
        {
            "ingest_one_connection_events_per_s": result.events_per_s,
            "ingest_one_connection_busiest_worker_cpu_share": busiest_share(stack, workers_before),
            # Relaying included: what passing half the streams on costs shows here.
            "ingest_one_connection_engine_cpu_us_per_event": engine_s / result.events * 1e6
            if result.events
            else None,
        }
    )


def busiest_share(stack: Stack, before: dict[int, float]) -> float | None:
    """The busiest worker's share of the engine's CPU since ``before``: 0.5 with two workers is an even
    split; above, the busiest one bounds the run."""
    workers = [s - before.get(p, 0.0) for p, s in processes_cpu_s(stack.engine_pid()).items()]
    return max(workers) / sum(workers) if sum(workers) else None


def ingest_cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of the engine (all workers), its Redis and this process (the client)."""
    return {
        "engine": tree_cpu_s(stack.engine_pid()),
        "redis": tree_cpu_s(stack.redis.pid),
        "client": time.process_time(),
    }


# --- 2. scheduler ------------------------------------------------------------------------------------


async def claim_all(redis_url: str, shards: int | Sequence[int], due: int) -> tuple[int, float, int, int]:
    """Run the real Dispatcher until ``due`` notices are claimed (or none is left) on ``shards`` (a
    count or the shard numbers): (claimed, seconds, round trips, commands)."""
    from engine.scheduler import Dispatcher

    trips = RoundTrips()
    client = counting_client(redis_url, trips)
    plain = connect(redis_url)
    try:
        dispatcher = Dispatcher(client, SystemClock(), shards, batch_size=1000)
        before = await command_stats(plain)
        trips.count = 0
        claimed = 0
        started = time.perf_counter()
        while claimed < due:
            stats = await dispatcher.claim_once()
            claimed += stats.claimed
            if stats.claimed == 0 and not stats.saturated:
                break
        seconds = time.perf_counter() - started
        commands = (await command_stats(plain)).minus(before)
        return claimed, seconds, trips.count, commands.total - commands.calls.get("info", 0)
    finally:
        await client.aclose()
        await plain.aclose()


async def bench_claim_and_send(results: Results, stack: Stack, shards: int, run_dir: Path) -> None:
    """The notices the engine planned during ingest: claimed by the real Dispatcher, half the shards
    at a time, each half then sent by the gateway — limits on for the first, off for the second."""
    redis = connect(stack.redis_url)
    try:
        due_now = (await backlog(redis, shards, time.time_ns() // 1_000_000)).due_now
    finally:
        await redis.aclose()
    halves = (range(0, shards // 2), range(shards // 2, shards))
    claimed = trips = commands = 0
    claim_s = 0.0
    sent: list[tuple[int, float]] = []
    for half, limits in zip(halves, (True, False), strict=True):
        c, seconds, t, k = await claim_all(stack.redis_url, half, due_now)
        claimed, claim_s, trips, commands = claimed + c, claim_s + seconds, trips + t, commands + k
        sink = run_dir / ("sink-limits" if limits else "sink-nolimits")
        # One gateway process per core, as an operator would run them (loadtest.gateway_bench).
        from loadtest.gateway_bench import drain_with_gateways

        drained = await drain_with_gateways(stack.redis_url, shards, sink, limits=limits)
        sent.append((drained.sent, drained.seconds))
        results.figures["gateway_processes"] = drained.processes
    (on, on_s), (off, off_s) = sent
    results.figures.update(
        {
            "claim_notices": claimed,
            "claim_notices_per_s": claimed / claim_s if claim_s else None,
            "redis_round_trips_per_notice": trips / claimed if claimed else None,
            "redis_commands_per_notice": commands / claimed if claimed else None,
            "gateway_notices": on,
            "gateway_notices_per_s": on / on_s if on_s else None,
            "gateway_nolimit_notices": off,
            "gateway_nolimit_notices_per_s": off / off_s if off_s else None,
        }
    )


# Claim-rate rounds at each pending size, interleaved: one round claims ``claim_small`` notices, so
# one round is a few tens of milliseconds; the median of several tells more than one.
CLAIM_ROUNDS = 21


async def fill_due(
    redis: Redis, shards: range, pending: int, due: int, body: bytes, prefix: str
) -> list[tuple[int, str]]:
    """Synthetic pending notices in the engine's layout (body in the parcel hash, id in the due set)
    on the shard numbers ``shards``: the first ``due`` due now, the rest tomorrow. Returns the due
    members (shard, member), to arm them again after a round claimed them."""
    now_ms = time.time_ns() // 1_000_000
    due_members: list[tuple[int, str]] = []
    chunk = 10_000
    for start in range(0, pending, chunk):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(pending, start + chunk)):
            parcel_id = f"{prefix}-{n:09d}"
            shard = shards[keys.shard_of(parcel_id, len(shards))]
            member = f"{parcel_id}:SHIPPED"
            pipe.hset(keys.parcel(shard, parcel_id), mapping={"n:SHIPPED": body, "nv:SHIPPED": 1})
            if n < due:
                due_members.append((shard, member))
                score = now_ms - 1
            else:
                score = now_ms + 86_400_000
            pipe.zadd(keys.due(shard), {member: score})
        await pipe.execute()
    return due_members


async def arm(redis: Redis, members: Sequence[tuple[int, str]]) -> None:
    """Put claimed members back in their due sets, due now (their bodies stayed in the hashes)."""
    now_ms = time.time_ns() // 1_000_000
    pipe = redis.pipeline(transaction=False)
    for shard, member in members:
        pipe.zadd(keys.due(shard), {member: now_ms - 1})
    await pipe.execute()


async def bench_scheduler_scale(results: Results, sizes: Sizes, redis_url: str, shards: int) -> None:
    """The claim rate with ``claim_small`` notices pending (all due) and with ``claim_large_pending``
    pending of which as many are due: the same claims, only the due sets' size differs. The two live
    side by side on separate shard numbers and take turns, ``CLAIM_ROUNDS`` times; medians reported."""
    from relais.v1 import notice_pb2, types_pb2

    body = notice_pb2.Notice(
        notice_id="BS-000000000:SHIPPED",
        version=1,
        kind=types_pb2.NOTICE_KIND_SHIPPED,
        parcel_id="BS-000000000",
        merchant_id="lt-m-1",
        recipient_id="lt-r-1",
        carrier="swisspost",
        parcel_status=types_pb2.TRACKING_STATUS_IN_TRANSIT,
        paid=True,
    ).SerializeToString()
    claims = sizes.claim_small
    small_shards, large_shards = range(shards, 2 * shards), range(shards)
    redis = connect(redis_url)
    try:
        await redis.flushdb()
        small = await fill_due(redis, small_shards, claims, claims, body, "BS")
        large = await fill_due(redis, large_shards, sizes.claim_large_pending, claims, body, "BL")
        rates: dict[str, list[float]] = {"small": [], "large": []}
        for _ in range(CLAIM_ROUNDS):
            for label, shard_numbers, members in (
                ("small", small_shards, small),
                ("large", large_shards, large),
            ):
                claimed, seconds, _, _ = await claim_all(redis_url, list(shard_numbers), claims)
                if claimed != claims:
                    raise RuntimeError(f"claimed {claimed} of {claims} due notices ({label})")
                rates[label].append(claimed / seconds)
                await redis.delete(*(keys.outbox(s) for s in shard_numbers))
                await arm(redis, members)
        results.figures["claim_notices_per_s_at_10k_pending"] = statistics.median(rates["small"])
        results.figures["claim_notices_per_s_at_1m_pending"] = statistics.median(rates["large"])
        results.figures["claim_large_pending"] = sizes.claim_large_pending
        results.figures["claim_large_due"] = claims
        results.figures["claim_rounds"] = CLAIM_ROUNDS
        await redis.flushdb()
        arq = await measure_arq(redis_url, sizes.arq_jobs)
        results.figures["arq_jobs"] = arq.jobs
        results.figures["arq_jobs_per_s"] = arq.jobs_per_s
        await redis.flushdb()
    finally:
        await redis.aclose()


# --- 3. gateway: loadtest.gateway_bench.drain_with_gateways, called from bench_claim_and_send ----------


# --- 4. end to end ---------------------------------------------------------------------------------------


async def bench_e2e(results: Results, sizes: Sizes, run_dir: Path, shards: int, engine_workers: int) -> None:
    """Same-day parcels: one event each (first scan on the van, with a window) plans two notices
    (shipped, slot announced). Clock: first event sent → last notice in the sink."""
    config = StackConfig(run_dir=run_dir / "e2e", shards=shards, gateways=2, engine_workers=engine_workers)
    now_ms = time.time_ns() // 1_000_000
    # Two-step journeys cut to their first step: the budget in events is the number of notices.
    groups = make_groups("BE", sizes.e2e_notices, sizes.recipients, Mix(((Shape.SAME_DAY, 1.0),)))
    for group in groups:  # only the first step: delivery would cancel what is not sent yet
        group.journeys = [Journey(**{**_fields(j), "steps": j.steps[:1]}) for j in group.journeys]
    journeys = [j for g in groups for j in g.journeys]
    streams = plan_streams(groups, STREAMS, now_ms)
    with Stack(config) as stack:
        redis = connect(stack.redis_url)
        try:
            await set_up_recipients(stack.target, redis, shards, sizes.recipients)
            await register_all(stack.target, journeys, now_ms)
            started = time.perf_counter()
            sent = await stream_batches(stack.target, streams, window=WINDOW)
            expected = 2 * sent.accepted
            while time.perf_counter() - started < 600:
                await asyncio.sleep(0.25)
                seen = await backlog(redis, shards, time.time_ns() // 1_000_000)
                if seen.drained:
                    break
            seconds = time.perf_counter() - started
        finally:
            await redis.aclose()
        stack.stop_gateways()
        delivered = read_deliveries(config.sink_dir).total
    results.figures.update(
        {
            "e2e_events": sent.accepted,
            "e2e_notices": delivered,
            "e2e_notices_expected": expected,
            "e2e_seconds": seconds,
            "e2e_notices_per_s": delivered / seconds if seconds else None,
        }
    )


def _fields(journey: Journey) -> dict[str, Any]:
    return {name: getattr(journey, name) for name in Journey.__dataclass_fields__}


# --- 3b. GetParcel -----------------------------------------------------------------------------------

# Views the GetParcel floor answers with, taken from the engine's parcels (sizes as the engine's).
FLOOR_VIEWS = 200


async def bench_get_parcel(results: Results, sizes: Sizes, stack: Stack, run_dir: Path) -> None:
    """Open-loop GetParcel at 1,000 requests/s over the parcels ingest left (timelines, notices), from
    a client process of its own (16 connections, spread over the engine's workers); with the
    engine's and the client's CPU per call, and the load average the latencies were measured under.

    Then the same client, rate and time against the floor: bare grpc.aio processes, as many as the
    engine's workers, answering with views the engine just gave (``loadtest.echo_server``). What the
    framework and the machine cost a call that does nothing, measured beside the engine's."""
    seconds = 5.0 if sizes is QUICK else 30.0
    latency = await measure_get_parcel(
        stack.target, stack.redis_url, rps=1000.0, seconds=seconds, server_pid=stack.engine_pid()
    )
    results.figures.update(
        {f"get_parcel_{name}": value for name, value in dataclasses.asdict(latency).items()}
    )
    results.figures["get_parcel_load_average_1m"] = os.getloadavg()[0]
    views = run_dir / "views.bin"
    write_views(views, await fetch_views(stack.target, stack.redis_url, FLOOR_VIEWS))
    echo, echo_target = spawn_echo(run_dir, name="echo-get-parcel", views=views, workers=stack.engine_workers)
    try:
        await asyncio.sleep(1.0)
        floor = await measure_get_parcel(
            echo_target, stack.redis_url, rps=1000.0, seconds=seconds, server_pid=echo.pid
        )
    finally:
        echo.terminate()
        echo.wait()
    results.figures.update(
        {f"get_parcel_floor_{name}": value for name, value in dataclasses.asdict(floor).items()}
    )


async def fetch_views(target: str, redis_url: str, count: int) -> list[parcel_pb2.ParcelView]:
    """Up to ``count`` views, as GetParcel gives them, of parcels sampled from Redis."""
    redis = connect(redis_url)
    try:
        ids = await sample_parcel_ids(redis, count)
    finally:
        await redis.aclose()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = parcel_pb2_grpc.ParcelServiceStub(channel)
        return [await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=pid)) for pid in ids]


# --- 5. memory ---------------------------------------------------------------------------------------


async def bench_memory(results: Results, sizes: Sizes, stack: Stack, shards: int) -> None:
    """Parcels registered without a promised date and scanned once: exactly one pending notice
    (SHIPPED), since this stack runs no scheduler."""
    redis = connect(stack.redis_url)
    try:
        await redis.flushdb()
        await asyncio.sleep(0.2)
        before = await used_memory(redis)
        now_ms = time.time_ns() // 1_000_000
        plain = Mix(((Shape.PLAIN, 1.0),))  # three steps a journey; only the first is sent
        groups = make_groups("BM", 3 * sizes.memory_parcels, sizes.recipients, plain)
        journeys = [j for g in groups for j in g.journeys]
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = parcel_pb2_grpc.ParcelServiceStub(channel)
            for i in range(0, len(journeys), REGISTER_CHUNK):
                request = registrations(journeys[i : i + REGISTER_CHUNK], promised_date(now_ms))
                for parcel in request.parcels:
                    parcel.order.ClearField("promised_date")
                await stub.RegisterParcels(request)
        first_scans: list[list[Batch]] = [[] for _ in range(STREAMS)]
        for n, group in enumerate(groups):
            first_scans[n % STREAMS].append(encode_next(group, n + 1, now_ms))
        await stream_batches(stack.target, first_scans, window=WINDOW)
        pending = (await backlog(redis, shards, now_ms + 60_000)).due_now
        after = await used_memory(redis)
        parcels = len(journeys)
        results.figures.update(
            {
                "memory_parcels": parcels,
                "memory_pending_notices": pending,
                "redis_bytes_per_parcel": (after - before) / parcels if parcels else None,
            }
        )
    finally:
        await redis.aclose()


# --- the run ---------------------------------------------------------------------------------------------


SECTIONS = ("ingest", "scheduler", "gateway", "get_parcel", "one_connection", "e2e", "memory")


async def run(
    sizes: Sizes,
    run_dir: Path,
    shards: int,
    *,
    profile: bool = False,
    only: frozenset[str] = frozenset(),
    engine_workers: int = 1,
    balance: bool = True,
) -> Results:
    """Every section, or those named in ``only`` (scheduler and gateway run on what ingest left)."""
    results = Results()

    def wanted(name: str) -> bool:
        return not only or name in only

    engine_only = StackConfig(
        run_dir=run_dir / "engine",
        shards=shards,
        gateways=0,
        scheduler=False,
        engine_workers=engine_workers,
        profile_to=run_dir / "engine-profile.txt" if profile else None,
        env={"RELAIS_ENGINE_BALANCE_STREAMS": "on" if balance else "off"},
    )
    with Stack(engine_only) as stack:
        results.figures["engine_workers"] = stack.engine_workers
        redis = connect(stack.redis_url)
        try:
            await set_up_recipients(stack.target, redis, shards, sizes.recipients)
        finally:
            await redis.aclose()
        if wanted("ingest"):
            print("1. ingest", file=sys.stderr)
            await section(
                results,
                ["ingest_events_per_s", "echo_events_per_s", "engine_rss_bytes"],
                lambda: bench_ingest(results, sizes, stack, run_dir),
            )
        if wanted("scheduler") or wanted("gateway"):
            print("2-3. scheduler and gateway on the engine's notices", file=sys.stderr)
            await section(
                results,
                [
                    "claim_notices_per_s",
                    "redis_round_trips_per_notice",
                    "gateway_notices_per_s",
                    "gateway_nolimit_notices_per_s",
                ],
                lambda: bench_claim_and_send(results, stack, shards, run_dir),
            )
        if wanted("get_parcel"):
            print("3b. GetParcel at 1k rps on the ingested parcels", file=sys.stderr)
            await section(
                results,
                ["get_parcel_p99_ms", "get_parcel_floor_p99_ms"],
                lambda: bench_get_parcel(results, sizes, stack, run_dir),
            )
        if wanted("one_connection"):
            # After the sections that read what ingest left: its notices would change their counts.
            print("1b. ingest, 16 streams on one connection", file=sys.stderr)
            await section(
                results,
                ["ingest_one_connection_events_per_s"],
                lambda: bench_ingest_one_connection(results, sizes, stack),
            )
        if wanted("memory"):
            print("5. memory", file=sys.stderr)
            await section(
                results, ["redis_bytes_per_parcel"], lambda: bench_memory(results, sizes, stack, shards)
            )
        if wanted("scheduler"):
            print("2b. scheduler at scale, arq", file=sys.stderr)
            await section(
                results,
                ["claim_notices_per_s_at_1m_pending", "arq_jobs_per_s"],
                lambda: bench_scheduler_scale(results, sizes, stack.redis_url, shards),
            )
    if wanted("e2e"):
        print("4. end to end", file=sys.stderr)
        await section(
            results,
            ["e2e_notices", "e2e_seconds"],
            lambda: bench_e2e(results, sizes, run_dir, shards, engine_workers),
        )
    return results


ROWS = (
    ("ingest events/s (acked)", "ingest_events_per_s", "echo_events_per_s", "echo server"),
    (
        "ingest CPU us/event, engine",
        "ingest_engine_cpu_us_per_event",
        "ingest_redis_cpu_us_per_event",
        "Redis",
    ),
    (
        "ingest CPU us/event, 1 connection",
        "ingest_one_connection_engine_cpu_us_per_event",
        "ingest_engine_cpu_us_per_event",
        "16 connections",
    ),
    (
        "ingest events/s, 1 connection",
        "ingest_one_connection_events_per_s",
        "ingest_events_per_s",
        "16 connections",
    ),
    ("claims/s (engine's notices)", "claim_notices_per_s", "arq_jobs_per_s", "arq jobs/s"),
    (
        "claims/s, 1M pending",
        "claim_notices_per_s_at_1m_pending",
        "claim_notices_per_s_at_10k_pending",
        "10k",
    ),
    ("gateway notices/s (limits on)", "gateway_notices_per_s", "gateway_nolimit_notices_per_s", "limits off"),
    ("Redis round trips / notice", "redis_round_trips_per_notice", "redis_commands_per_notice", "commands"),
    ("end to end: notices", "e2e_notices", "e2e_seconds", "seconds"),
    ("GetParcel p99 ms at 1k rps", "get_parcel_p99_ms", "get_parcel_p50_ms", "p50"),
    ("GetParcel p99 ms, bare grpc.aio", "get_parcel_floor_p99_ms", "get_parcel_floor_p50_ms", "p50"),
    (
        "GetParcel CPU us/call, engine",
        "get_parcel_server_cpu_us_per_call",
        "get_parcel_client_cpu_us_per_call",
        "client",
    ),
    (
        "GetParcel CPU us/call, bare",
        "get_parcel_floor_server_cpu_us_per_call",
        "get_parcel_floor_client_cpu_us_per_call",
        "client",
    ),
    ("load average during GetParcel", "get_parcel_load_average_1m", None, ""),
    ("engine worker processes", "engine_workers", None, ""),
    ("machine loop s (lower: faster)", "machine_loop_s_after", "machine_loop_s_before", "before"),
    (
        "busiest worker's ingest CPU share",
        "ingest_busiest_worker_cpu_share",
        "ingest_one_connection_busiest_worker_cpu_share",
        "1 connection",
    ),
    ("Redis bytes / parcel", "redis_bytes_per_parcel", None, ""),
    ("engine RSS bytes", "engine_rss_bytes", None, ""),
)


# The reference loop the benchmark notes have timed since session 5: 20M additions in a fresh
# interpreter. One core, no IO: its seconds say how fast this machine runs Python right now.
SPEED_LOOP = "s = 0\nfor i in range(20_000_000):\n    s += i\n"


def machine_loop_s() -> float:
    """Seconds the reference loop takes in a fresh interpreter (its start-up excluded)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    startup_s = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", SPEED_LOOP], check=True)
    return max(time.perf_counter() - started - startup_s, 0.0)


def table(figures: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "null"
        return f"{value:,.2f}" if isinstance(value, float) and value < 100 else f"{value:,.0f}"

    lines = [f"{'figure':<32}{'value':>16}  {'baseline':>16}  {'ratio':>8}  baseline is"]
    for label, name, base, what in ROWS:
        value = figures.get(name)
        baseline = figures.get(base) if base else None
        ratio = (
            f"{value / baseline:.2f}x"
            if isinstance(value, int | float) and isinstance(baseline, int | float) and baseline
            else ""
        )
        lines.append(f"{label:<32}{fmt(value):>16}  {fmt(baseline) if base else '':>16}  {ratio:>8}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the size")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument(
        "--profile", action="store_true", help="profile the engine (pyinstrument; one worker)"
    )
    parser.add_argument(
        "--engine-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="engine processes on its port, as an operator runs it (default: one per core)",
    )
    parser.add_argument(
        "--no-balance",
        action="store_true",
        help="streams stay on the worker the kernel gave their connection (engine.stream_balance)",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections to run (of {', '.join(SECTIONS)}); default all"
    )
    args = parser.parse_args(argv)
    only = frozenset(name for name in args.only.split(",") if name)
    if only - set(SECTIONS):
        parser.error(f"--only: unknown sections {', '.join(sorted(only - set(SECTIONS)))}")
    sizes = QUICK if args.quick else FULL
    # The pid too: two runs may start in the same second.
    run_dir = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    speed_before_s = machine_loop_s()
    import uvloop

    results = uvloop.run(
        run(
            sizes,
            run_dir,
            args.shards,
            profile=args.profile,
            only=only,
            engine_workers=args.engine_workers,
            balance=not args.no_balance,
        )
    )
    required = {
        "ingest_events_per_s", "echo_events_per_s", "claim_notices_per_s",
        "claim_notices_per_s_at_1m_pending", "arq_jobs_per_s", "redis_round_trips_per_notice",
        "gateway_notices_per_s", "gateway_nolimit_notices_per_s", "e2e_notices", "e2e_seconds",
        "redis_bytes_per_parcel", "engine_rss_bytes",
    }  # fmt: skip
    for name in required - results.figures.keys():
        reason = "not run (--only)" if only else "not measured (its section failed before reaching it)"
        results.unavailable([name], reason)
    results.figures["machine_loop_s_before"] = speed_before_s
    results.figures["machine_loop_s_after"] = machine_loop_s()
    document = {
        **results.figures,
        "reasons": results.reasons,
        "quick": args.quick,
        "sizes": dataclasses.asdict(sizes),
        "seconds": time.monotonic() - started,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "grpcio_version": grpc.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    document["only"] = sorted(only)
    # A partial run does not replace the last whole run's figures.
    written = [run_dir / "bench.json"] if only else [RESULTS / "bench.json", run_dir / "bench.json"]
    for path in written:
        path.write_text(json.dumps(document, indent=2))
    print(table(results.figures))
    for name, reason in sorted(results.reasons.items()):
        print(f"  {name}: null — {reason}")
    print(f"written: {written[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
