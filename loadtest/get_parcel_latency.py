"""GetParcel latency at a fixed request rate: the "where is my order?" budget (p99 under 5 ms at 1k rps).

Open loop: call *i* is due at ``start + i / rps`` and its latency is measured from that due time, not
from when it was actually sent, so a stalled server shows up in the tail instead of silently lowering
the rate (no coordinated omission). Parcels are sampled from Redis, so they carry real timelines and
notices. ``python -m loadtest.get_parcel_latency --target 127.0.0.1:50051 --redis redis://...``.

The client costs CPU too (~300 us a call in Python here, a third of a core at 1k rps), on the same
cores as the engine: the benchmark runs it in a process of its own (``measure_in_process``), fresh,
so its loop is not shared with the harness nor its heap swollen by the harness's data. It opens
``channels`` connections, each its own (a private subchannel pool: grpc otherwise shares one
connection between channels to one target), so the kernel spreads them over the engine's workers.
Given the engine's pid, it also reports the engine's CPU per call (its process and workers, over the
timed part) and its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass

import grpc
import psutil
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc

from common import keys
from common.collector import ENGINE_YOUNG_THRESHOLD, tune_collector
from common.redis_client import connect
from loadtest.audit import percentile
from loadtest.meter import process_tree

CHANNELS = 16


@dataclass(frozen=True)
class Latency:
    calls: int
    errors: int
    rps_target: float
    rps_achieved: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # CPU time per call over the timed part: the engine's processes (None without their pid), the client.
    server_cpu_us_per_call: float | None = None
    client_cpu_us_per_call: float | None = None


async def sample_parcel_ids(redis: Redis, count: int) -> list[str]:
    """Up to ``count`` parcel ids, read off the parcel keys (``relais:p:{s}:<id>``)."""
    ids: list[str] = []
    async for key in redis.scan_iter(match=keys.PREFIX + "p:*", count=1000):
        ids.append(key.decode().split("}:", 1)[1])
        if len(ids) >= count:
            break
    return ids


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its children so far; 0 without a pid."""
    return sum(processes_cpu_s(pid).values())


def processes_cpu_s(pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) so far of a process and each of its children, by pid."""
    if pid is None:
        return {}
    spent: dict[int, float] = {}
    for proc in process_tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        spent[proc.pid] = times.user + times.system
    return spent


async def measure(
    target: str,
    parcel_ids: list[str],
    *,
    rps: float,
    seconds: float,
    channels: int = CHANNELS,
    server_pid: int | None = None,
) -> Latency:
    if not parcel_ids:
        raise ValueError("no parcels to read")
    calls = int(rps * seconds)
    private = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(target, options=private) for _ in range(channels)]
    stubs = [parcel_pb2_grpc.ParcelServiceStub(c) for c in opened]
    latencies_ms: list[float] = []
    errors = 0

    async def one(i: int, due_s: float, parcel_id: str) -> None:
        nonlocal errors
        try:
            await stubs[i % channels].GetParcel(parcel_pb2.GetParcelRequest(parcel_id=parcel_id), timeout=5)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies_ms.append((time.perf_counter() - due_s) * 1000)

    try:
        # Warm the connections (TCP, HTTP/2, the server's first-call paths) before timing.
        await asyncio.gather(*(one(i, time.perf_counter(), parcel_ids[0]) for i in range(channels)))
        latencies_ms.clear()
        # Only the calls in flight are kept: holding every finished task made the client's own full
        # collections walk tens of thousands of them, a pause that showed up in the latencies.
        in_flight: set[asyncio.Task[None]] = set()
        server_before, client_before = tree_cpu_s(server_pid), time.process_time()
        start = time.perf_counter()
        for i, parcel_id in zip(range(calls), itertools.cycle(parcel_ids), strict=False):
            due_s = start + i / rps
            delay_s = due_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            task = asyncio.create_task(one(i, due_s, parcel_id))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        elapsed_s = time.perf_counter() - start
        server_s, client_s = tree_cpu_s(server_pid) - server_before, time.process_time() - client_before
    finally:
        for channel in opened:
            await channel.close(None)
    if not latencies_ms:
        raise RuntimeError(f"every one of {calls} calls failed")

    def at(q: int) -> float:
        value = percentile(latencies_ms, q)
        assert value is not None  # there are latencies
        return value

    return Latency(
        calls=calls,
        errors=errors,
        rps_target=rps,
        rps_achieved=len(latencies_ms) / elapsed_s,
        p50_ms=at(50),
        p95_ms=at(95),
        p99_ms=at(99),
        max_ms=max(latencies_ms),
        server_cpu_us_per_call=server_s / calls * 1e6 if server_pid is not None else None,
        client_cpu_us_per_call=client_s / calls * 1e6,
    )


async def measure_in_process(
    target: str, redis_url: str, *, rps: float, seconds: float, server_pid: int | None = None
) -> Latency:
    """``measure`` in a fresh process of its own (see the module's docstring)."""
    args = ["--target", target, "--redis", redis_url, "--rps", str(rps), "--seconds", str(seconds), "--json"]
    if server_pid is not None:
        args += ["--server-pid", str(server_pid)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.get_parcel_latency", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the GetParcel client exited with code {proc.returncode}")
    return Latency(**json.loads(out.decode().strip().splitlines()[-1]))


async def _main(args: argparse.Namespace) -> None:
    redis = connect(args.redis)
    try:
        ids = await sample_parcel_ids(redis, args.parcels)
    finally:
        await redis.aclose()
    # What set-up allocated stays put: the collector then walks only the calls' own objects, and
    # rarely (the engine's settings).
    tune_collector(ENGINE_YOUNG_THRESHOLD)
    result = await measure(
        args.target,
        ids,
        rps=args.rps,
        seconds=args.seconds,
        channels=args.channels,
        server_pid=args.server_pid,
    )
    if args.json:
        print(json.dumps(asdict(result)))
        return
    for name, value in asdict(result).items():
        print(f"{name:>22} {value:,.2f}" if isinstance(value, float) else f"{name:>22} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="the engine's host:port")
    parser.add_argument("--redis", required=True, help="the engine's REDIS_URL (to sample parcels)")
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--parcels", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=CHANNELS, help="client connections")
    parser.add_argument("--server-pid", type=int, help="the engine's pid: report its CPU per call")
    parser.add_argument("--json", action="store_true", help="one JSON line (what the benchmark reads)")
    import uvloop

    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
