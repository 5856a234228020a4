"""Building an email from a ``Message`` with the standard ``email`` package only (pure, no IO).

Header injection is impossible by construction: CR and LF in a subject or display name are folded
to spaces before they reach a header, and ``policy.SMTP`` refuses any header value that still holds
one. The Message-ID is derived from the idempotency key, so a resend after a crash carries the same
id and mail systems can recognise the duplicate.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from channels.base import EmailAddress, Message

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")


class InvalidAddressError(ValueError):
    """The destination is not a usable mailbox (never reaches a log: it is personal data)."""


def one_line(text: str) -> str:
    """Fold every kind of line break into one space: header text must stay one header."""
    return _LINE_BREAKS.sub(" ", text).strip()


def message_id(idempotency_key: str, domain: str) -> str:
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def mailbox(address: EmailAddress) -> Address:
    spec = address.address.strip()
    if not spec or _LINE_BREAKS.search(spec) or spec.count("@") != 1:
        raise InvalidAddressError("not a mailbox")
    try:
        parsed = Address(display_name=one_line(address.display_name), addr_spec=spec)
    except (HeaderParseError, ValueError, IndexError):
        raise InvalidAddressError("not a mailbox") from None
    if not parsed.username or not parsed.domain or "." not in parsed.domain.strip("."):
        raise InvalidAddressError("not a mailbox")
    return parsed


def build_email(message: Message, *, sender: EmailAddress, message_id_domain: str) -> EmailMessage:
    """The MIME message: text/plain, plus text/html as multipart/alternative when there is HTML.

    Raises ``InvalidAddressError`` when the destination is not an ``EmailAddress`` or not a mailbox.
    """
    if not isinstance(message.to, EmailAddress):
        raise InvalidAddressError(f"email cannot reach a {type(message.to).__name__}")
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = mailbox(sender)
    mail["To"] = mailbox(message.to)
    mail["Subject"] = one_line(message.subject)
    mail["Message-ID"] = message_id(message.idempotency_key, message_id_domain)
    mail["Date"] = format_datetime(_now_utc())
    mail.set_content(message.text)
    if message.html:
        mail.add_alternative(message.html, subtype="html")
    # After the body: making the message multipart moves Content-* headers into the first part.
    mail["Content-Language"] = one_line(message.locale) or "en"
    return mail


def _now_utc() -> datetime:
    return datetime.now(UTC)
