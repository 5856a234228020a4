"""A channel that accepts everything at once and sends nothing: for load tests and benchmarks, where
the gateway's own cost is what is measured. It takes no options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Self

from channels.base import Accepted, Message, SendResult
from channels.options import Options


class NullChannel:
    name = "null"

    def __init__(self) -> None:
        self.accepted = 0

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        Options("null", options).finish()
        return cls()

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        self.accepted += len(messages)
        return [Accepted(provider_message_id=f"null:{m.idempotency_key}") for m in messages]

    async def aclose(self) -> None:
        return None
