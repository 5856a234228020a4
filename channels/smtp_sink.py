"""A local SMTP server that keeps what it receives: each message becomes one ``.eml`` file in an
outbox folder (default ``var/sink/smtp``), so ``make run`` shows what recipients would get without
a real mail server. Loopback only, no TLS, no AUTH: it is a developer's sink, not a relay.

Use inside a running event loop::

    sink = SmtpSink(Path("var/sink/smtp"))
    host, port = await sink.start()   # point the email channel at it with tls=none
    ...
    await sink.stop()

Or on its own: ``python -m channels.smtp_sink --port 2525 --outbox var/sink/smtp``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

DEFAULT_OUTBOX = Path("var/sink/smtp")


class _OutboxHandler:
    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self._sequence = itertools.count(1)

    async def handle_DATA(  # noqa: N802 - the hook name aiosmtpd calls
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        # Time first so a directory listing reads in arrival order; the counter breaks ties.
        name = f"{time.time_ns()}-{os.getpid()}-{next(self._sequence):06d}.eml"
        await asyncio.to_thread(_write_atomically, self.outbox / name, content)
        return "250 2.0.0 Ok: kept in outbox"


def _write_atomically(path: Path, content: bytes) -> None:
    # Write then rename, so a reader watching the folder never opens a half-written file.
    partial = path.with_suffix(".part")
    partial.write_bytes(content)
    partial.replace(path)


class SmtpSink:
    def __init__(self, outbox: Path = DEFAULT_OUTBOX, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in {"127.0.0.1", "::1", "localhost"}:
            raise ValueError("the SMTP sink listens on loopback only")
        self.outbox = outbox
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        # SMTP connections accepted so far: how well a client reuses its connections.
        self.connections_accepted = 0

    async def start(self) -> tuple[str, int]:
        """Listen; returns the (host, port) actually bound (port 0 picks a free one)."""
        self.outbox.mkdir(parents=True, exist_ok=True)
        # Under `relais run` the sink logs into the engine's log, where no personal data may go, and
        # aiosmtpd's "mail.log" writes its whole transcript at INFO and DEBUG: each command line and
        # envelope address ("RCPT TO:<...>", "recip: ..."). Its warnings and errors name only the peer
        # (loopback) and a command's verb, so they stay. A level set quieter than WARNING is kept.
        protocol_log = logging.getLogger("mail.log")
        protocol_log.setLevel(max(logging.WARNING, protocol_log.level))
        loop = asyncio.get_running_loop()
        handler = _OutboxHandler(self.outbox)

        def connection() -> SMTP:
            self.connections_accepted += 1
            return SMTP(handler, hostname="relais-sink", loop=loop)

        self._server = await loop.create_server(connection, self.host, self.port)
        bound = self._server.sockets[0].getsockname()
        self.port = int(bound[1])
        return self.host, self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(outbox: Path, port: int) -> None:
    """Run the sink until cancelled (Ctrl-C)."""
    async with SmtpSink(outbox, port=port) as sink:
        print(f"SMTP sink on {sink.host}:{sink.port}, writing to {outbox}/", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Keep every message sent to a loopback SMTP port.")
    parser.add_argument("--outbox", type=Path, default=DEFAULT_OUTBOX)
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.outbox, args.port))


if __name__ == "__main__":
    main()
