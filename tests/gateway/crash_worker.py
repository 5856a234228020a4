"""A gateway process for the kill -9 test: the real worker, with a slow file channel as its email
provider. Run as ``python -m tests.gateway.crash_worker <redis url> <out dir> <consumer name>``.

The channel stands in for a provider that deduplicates by idempotency key (as SMTP Message-ID or an
SMS client reference lets one do): every send is appended to ``attempts.log`` before it is made, the
message lands as ``sent/<digest of key>`` once, and a resend of a key already there changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Self

from channels.base import Accepted, Message, SendResult
from common.clock import SystemClock
from common.redis_client import connect
from gateway.worker import run_gateway
from tests.gateway.support import settings

SEND_S = 0.01


class SlowFileChannel:
    name = "email"

    def __init__(self, out_dir: Path) -> None:
        self._out = out_dir
        (out_dir / "sent").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(Path(options["dir"]))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        for message in messages:
            with (self._out / "attempts.log").open("a") as log:
                log.write(message.idempotency_key + "\n")
            await asyncio.sleep(SEND_S)
            name = hashlib.sha256(message.idempotency_key.encode()).hexdigest()
            try:
                fd = os.open(self._out / "sent" / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, message.text.encode())
                os.close(fd)
            except FileExistsError:
                pass  # the provider recognises the key: delivered once
            results.append(Accepted(name[:16]))
        return results

    async def aclose(self) -> None:
        return None


async def main(redis_url: str, out_dir: Path, consumer: str) -> None:
    cfg = settings(send_timeout_s=1.0, batch_size=5, max_in_flight=2, reclaim_interval_s=0.2, block_ms=50)
    cfg = replace(cfg, gateway=replace(cfg.gateway, limits_enabled=False))
    redis = connect(redis_url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    channels = {"email": SlowFileChannel(out_dir)}
    await run_gateway(cfg, redis, SystemClock(), channels, stop, consumer=consumer)
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
