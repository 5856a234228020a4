"""A channel that accepts everything and writes down what it was given: the load test's sink.

Each ``send`` appends one line per message, ``<idempotency key>\\t<unix ms>``, to
``<dir>/sent-<pid>.tsv`` (one file per gateway process, so several gateways never interleave), and
flushes once per call. Afterwards ``read_deliveries`` counts deliveries per idempotency key: the run
checks every expected notice arrived exactly once, and takes the send times for the lag from due
time to send. It is not an installed channel (no ``relais.channels`` entry point names it):
``loadtest.sink_gateway`` hands it to the gateway itself, under the catch-all name ``null``.
``from_options`` takes ``dir`` (required); ``count`` is only the name its option errors use.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from channels.base import Accepted, Message, SendResult
from channels.options import Options


class CountingChannel:
    name = "count"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"sent-{os.getpid()}.tsv"
        self._file: IO[str] | None = self.path.open("a", encoding="ascii", buffering=1 << 20)
        self._sent = 0

    @property
    def sent(self) -> int:
        """Messages accepted so far by this channel object."""
        return self._sent

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        opts = Options(cls.name, options)
        directory = Path(opts.required("dir"))
        opts.finish()
        return cls(directory)

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        if self._file is None:
            raise RuntimeError("the counting channel is closed")
        now_ms = time.time_ns() // 1_000_000
        self._file.write("".join(f"{m.idempotency_key}\t{now_ms}\n" for m in messages))
        self._file.flush()
        results: list[SendResult] = []
        for _ in messages:
            self._sent += 1
            results.append(Accepted(provider_message_id=f"count-{os.getpid()}-{self._sent}"))
        return results

    async def aclose(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True, slots=True)
class Deliveries:
    """What the counting channels received: sends per idempotency key and the first send time."""

    per_key: Counter[str]
    first_sent_ms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_key.values())

    @property
    def duplicated(self) -> dict[str, int]:
        return {key: n for key, n in self.per_key.items() if n > 1}


def _lines(directory: Path) -> Iterator[tuple[str, int]]:
    for path in sorted(directory.glob("sent-*.tsv")):
        with path.open(encoding="ascii") as f:
            for line in f:
                key, _, sent = line.rstrip("\n").partition("\t")
                if key:
                    yield key, int(sent)


def read_deliveries(directory: Path) -> Deliveries:
    per_key: Counter[str] = Counter()
    first: dict[str, int] = {}
    for key, sent_ms in _lines(directory):
        per_key[key] += 1
        if key not in first or sent_ms < first[key]:
            first[key] = sent_ms
    return Deliveries(per_key=per_key, first_sent_ms=first)
