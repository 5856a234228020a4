"""Where the engine spends its time on ingest: ``python -m loadtest.profile [--events 20000]``.

Starts the engine (without scheduler) under pyinstrument, registers the parcels, streams the events
as the ingest benchmark does, stops the engine so the profiler writes its report, and prints it
(also kept as ``loadtest/results/profile-<time>/engine-profile.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from common.redis_client import connect
from loadtest.bench import RESULTS, STREAMS, WINDOW, make_groups, register_all
from loadtest.ingest_client import plan_streams, stream_batches
from loadtest.recipients import set_up_recipients
from loadtest.stack import Stack, StackConfig


async def profile(events: int, run_dir: Path, shards: int) -> float:
    config = StackConfig(
        run_dir=run_dir, shards=shards, gateways=0, scheduler=False, profile_to=run_dir / "engine-profile.txt"
    )
    with Stack(config) as stack:
        redis = connect(stack.redis_url)
        try:
            await set_up_recipients(stack.target, redis, shards, 2000)
        finally:
            await redis.aclose()
        now_ms = time.time_ns() // 1_000_000
        groups = make_groups("PR", events, 2000)
        await register_all(stack.target, [j for g in groups for j in g.journeys], now_ms)
        result = await stream_batches(stack.target, plan_streams(groups, STREAMS, now_ms), window=WINDOW)
    return result.events_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    run_dir = RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rate = asyncio.run(profile(args.events, run_dir, args.shards))
    report = run_dir / "engine-profile.txt"
    print(report.read_text() if report.exists() else f"no profile written: see {run_dir / 'logs'}")
    print(f"ingest under the profiler: {rate:,.0f} events/s; report: {report}")


if __name__ == "__main__":
    main()
