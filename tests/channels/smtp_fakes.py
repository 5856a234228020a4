"""A real aiosmtpd server in the test's event loop that records what it receives, counts the
connections it accepts and can refuse chosen recipients with a chosen reply, refuse to relay, or
reject a message after DATA on a policy ground, as real servers do."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool
    authenticated: bool

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class RecordingSmtp:
    tls_context: ssl.SSLContext | None = None
    require_starttls: bool = False
    credentials: tuple[str, str] | None = None
    # recipient address -> SMTP reply to its RCPT, e.g. "550 5.1.1 No such user"
    refuse: dict[str, str] = field(default_factory=dict)
    # Domains it accepts mail for from anyone; None: every domain. A session that has not
    # authenticated gets Postfix's reply for any other recipient (reject_unauth_destination).
    relay_domains: frozenset[str] | None = None
    # Replaces "250 queued" at the end of DATA, e.g. Gmail's "550 5.7.26 ..." for a message that fails
    # the sender domain's DMARC policy: the content is judged only after it has been received.
    data_reply: str = ""
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _protocols: list[SMTP] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        domain = address.rpartition("@")[2].lower()
        if self.relay_domains is not None and domain not in self.relay_domains and not session.authenticated:
            return f"554 5.7.1 <{address}>: Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                raw=envelope.original_content or b"",
                tls=session.ssl is not None,
                authenticated=bool(session.authenticated),
            )
        )
        return "250 2.0.0 Ok: queued"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            self.credentials is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        # handled=False: aiosmtpd itself sends 235 or 535.
        return AuthResult(success=ok, handled=False)

    def _protocol(self) -> SMTP:
        self.connections += 1
        protocol = SMTP(
            self,
            hostname="fake-smtp",
            tls_context=self.tls_context,
            require_starttls=self.require_starttls,
            authenticator=self._authenticate if self.credentials else None,
            auth_required=self.credentials is not None,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.append(protocol)
        return protocol

    async def start(self) -> RecordingSmtp:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def drop_connections(self) -> None:
        """Close every open connection from the server side, as a server restart would."""
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        self._protocols.clear()

    async def stop(self) -> None:
        self.drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
