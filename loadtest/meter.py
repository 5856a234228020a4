"""What one measured stretch of a benchmark costs: this process's CPU time, the redis-server's own CPU
time (its ``INFO cpu``), and, on request, a cProfile of it or callgrind's instructions
(``loadtest.callgrind``). ``loadtest.ingest_cpu`` and ``loadtest.gateway_bench`` measure with it;
``process_tree`` is what the engine's figures add up over (its workers).
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psutil
from redis.asyncio import Redis

from loadtest.callgrind import instrument


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and its children: an engine with its workers, whose CPU and memory add up."""
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


async def redis_cpu_s(redis: Redis) -> float:
    """The redis-server's CPU time so far: what the Lua scripts and commands cost it."""
    info: dict[str, Any] = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass(slots=True)
class Metered:
    cpu_s: float = 0.0
    redis_s: float = 0.0


@asynccontextmanager
async def metered(
    redis: Redis, *, profile: str = "", instrumented: Sequence[int] = (), top: int = 50
) -> AsyncIterator[Metered]:
    """Measure the body. ``profile``: print cProfile's ``top`` functions sorted by ``self`` or
    ``cum`` time. ``instrumented``: processes under callgrind (this one, a redis-server) whose
    instrumentation is on for the body only."""
    figures = Metered()
    profiler = cProfile.Profile() if profile else None
    redis_before = await redis_cpu_s(redis)
    for pid in instrumented:
        instrument("on", pid)
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    try:
        yield figures
    finally:
        figures.cpu_s = time.process_time() - started
        if profiler is not None:
            profiler.disable()
        for pid in instrumented:
            instrument("off", pid)
    figures.redis_s = await redis_cpu_s(redis) - redis_before
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative" if profile == "cum" else "tottime").print_stats(top)
