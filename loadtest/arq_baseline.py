"""The scheduler's baseline: how fast arq's worker picks up deferred jobs from the same Redis.

arq keeps deferred jobs in a sorted set scored by their run time, as relais keeps due notices; its
worker polls, claims each job with a WATCH/MULTI transaction, runs it and settles it. Jobs here call
a no-op function and keep no result, so the rate is arq's pick-up machinery and nothing else. The
worker is given generous concurrency (``max_jobs``) and a short poll delay, to be fair to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

QUEUE = "relais-bench:arq"
ENQUEUE_CONCURRENCY = 200


@dataclass(frozen=True, slots=True)
class ArqResult:
    jobs: int
    seconds: float

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


async def noop(ctx: dict[str, Any], n: int) -> None:
    """The job: nothing, so only arq's own costs are measured."""


def redis_settings(url: str) -> RedisSettings:
    parts = urlsplit(url)
    database = int(parts.path.lstrip("/") or 0)
    return RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, database=database)


async def measure_arq(url: str, jobs: int, *, max_jobs: int = 500) -> ArqResult:
    """Enqueue ``jobs`` deferred jobs (untimed), let them fall due, then time a burst worker."""
    settings = redis_settings(url)
    pool = await create_pool(settings, default_queue_name=QUEUE)
    try:
        due_at = datetime.now(tz=UTC) + timedelta(milliseconds=200)
        sem = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

        async def enqueue(n: int) -> None:
            async with sem:
                await pool.enqueue_job("noop", n, _job_id=f"bench-{n}", _defer_until=due_at)

        await asyncio.gather(*(enqueue(n) for n in range(jobs)))
        await asyncio.sleep(max(0.0, (due_at - datetime.now(tz=UTC)).total_seconds()))
        worker = Worker(
            functions=[func(noop, name="noop")],
            queue_name=QUEUE,
            redis_pool=pool,
            burst=True,
            handle_signals=False,
            max_jobs=max_jobs,
            keep_result=0,
            poll_delay=0.001,
            log_results=False,
        )
        logging.getLogger("arq").setLevel(logging.WARNING)
        started = time.perf_counter()
        await worker.async_run()
        seconds = time.perf_counter() - started
        return ArqResult(jobs=worker.jobs_complete, seconds=seconds)
    finally:
        await pool.aclose()
