"""Email to the local SMTP sink, messages per second with connection reuse:
``python -m loadtest.email_throughput --messages 2000 --pool 4``.

The real ``EmailChannel`` (aiosmtplib, its connection pool) sends to the real ``SmtpSink`` (aiosmtpd on
loopback, writing each message to a file), in batches as the gateway hands them over; the sink counts
the connections it accepted, so the reuse is measured, not assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from channels.base import Accepted, EmailAddress, Message
from channels.email import EmailChannel
from channels.smtp_sink import SmtpSink


async def measure(messages: int, pool: int, batch: int) -> tuple[float, int, int]:
    """(messages per second, accepted, connections the sink accepted)."""
    with tempfile.TemporaryDirectory(prefix="relais-email-") as outbox:
        sink = SmtpSink(Path(outbox))
        host, port = await sink.start()
        connections = 0
        channel = EmailChannel.from_options(
            {
                "host": host,
                "port": str(port),
                "tls": "none",
                "from": "notices@relais.invalid",
                "pool_size": str(pool),
            }
        )
        try:
            to_send = [
                Message(
                    idempotency_key=f"p-{i}:SHIPPED:1:email",
                    to=EmailAddress(f"r{i}@example.org"),
                    subject="Votre colis est en route",
                    text="Bonjour,\nvotre colis est en route.\n",
                    html="<p>Bonjour,</p><p>votre colis est en route.</p>",
                    locale="fr",
                )
                for i in range(messages)
            ]
            started = time.perf_counter()
            accepted = 0
            for i in range(0, messages, batch):
                results = await channel.send(to_send[i : i + batch])
                accepted += sum(isinstance(r, Accepted) for r in results)
            elapsed_s = time.perf_counter() - started
            connections = sink.connections_accepted
        finally:
            await channel.aclose()
            await sink.stop()
    return accepted / elapsed_s, accepted, connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    rate, accepted, connections = asyncio.run(measure(args.messages, args.pool, args.batch))
    print(f"{accepted} messages accepted, {rate:,.0f} messages/s, {connections} SMTP connections")


if __name__ == "__main__":
    main()
