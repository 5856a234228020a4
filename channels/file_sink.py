"""A channel that writes what recipients would receive into files, so a newcomer running relais
locally can read every message: ``<dir>/email/*.eml`` (the exact MIME message the email channel
would send) and one JSON document per SMS (``sms/``) or push (``fcm/``, ``apns/``, ``webpush/``).

The file name comes from the idempotency key, so a resend overwrites the same file: what the folder
shows is what a recipient would see, once.

Options (``RELAIS_CHANNEL_FILE_<OPTION>``): ``dir`` (``var/sink``), ``from`` (the sender written into
emails, ``notices@relais.invalid``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from channels.base import (
    Accepted,
    ApnsToken,
    EmailAddress,
    FcmToken,
    Message,
    PermanentFailure,
    PhoneNumber,
    SendResult,
    WebPushSubscription,
)
from channels.email_message import InvalidAddressError, build_email
from channels.options import Options
from channels.sms_encoding import split

DEFAULT_DIR = Path("var/sink")
DEFAULT_SENDER = "notices@relais.invalid"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(idempotency_key: str, suffix: str) -> str:
    # Readable prefix for a human, hash for uniqueness (two keys may sanitise to the same prefix).
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', idempotency_key)[:80]}-{digest}{suffix}"


def _push_document(message: Message) -> dict[str, object]:
    return {
        "title": message.subject,
        "body": message.text,
        "data": dict(message.data),
        "collapse_key": message.collapse_key,
        "expires_at": message.expires_at.isoformat() if message.expires_at else None,
        "locale": message.locale,
        "idempotency_key": message.idempotency_key,
    }


def render(message: Message, sender: EmailAddress) -> tuple[str, bytes]:
    """(kind folder, file content) for one message. Raises InvalidAddressError for a bad mailbox."""
    to = message.to
    if isinstance(to, EmailAddress):
        domain = sender.address.rpartition("@")[2]
        return "email", bytes(build_email(message, sender=sender, message_id_domain=domain))
    document: dict[str, object]
    if isinstance(to, PhoneNumber):
        parts = split(message.text)
        document = {
            "to": to.e164,
            "text": message.text,
            "encoding": parts.encoding.value,
            "segments": parts.count,
            "idempotency_key": message.idempotency_key,
        }
        kind = "sms"
    elif isinstance(to, FcmToken):
        document, kind = {"to": to.token, **_push_document(message)}, "fcm"
    elif isinstance(to, ApnsToken):
        document, kind = {"to": to.device_token, "bundle_id": to.bundle_id, **_push_document(message)}, "apns"
    else:
        assert isinstance(to, WebPushSubscription)
        document, kind = {"to": to.endpoint, **_push_document(message)}, "webpush"
    return kind, json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"


def _write_all(files: list[tuple[Path, bytes]]) -> None:
    for path, content in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: someone watching the folder never opens a half-written file.
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(content)
        partial.replace(path)


class FileChannel:
    name = "file"

    def __init__(self, directory: Path = DEFAULT_DIR, sender: EmailAddress | None = None) -> None:
        self.directory = directory
        self.sender = sender or EmailAddress(DEFAULT_SENDER, "relais")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        opts = Options("file", options)
        directory = Path(opts.text("dir", str(DEFAULT_DIR)))
        sender = opts.text("from", DEFAULT_SENDER)
        if sender.count("@") != 1:
            raise opts.error("from", "is not an email address")
        opts.finish()
        return cls(directory, EmailAddress(sender, "relais"))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        files: list[tuple[Path, bytes]] = []
        for message in messages:
            try:
                kind, content = render(message, self.sender)
            except InvalidAddressError:
                results.append(PermanentFailure("file: not a mailbox", destination_invalid=True))
                continue
            suffix = ".eml" if kind == "email" else ".json"
            path = self.directory / kind / file_name(message.idempotency_key, suffix)
            files.append((path, content))
            results.append(Accepted(provider_message_id=str(path)))
        try:
            await asyncio.to_thread(_write_all, files)
        except OSError as exc:
            failure = PermanentFailure(f"file: cannot write ({type(exc).__name__})")
            return [failure if isinstance(r, Accepted) else r for r in results]
        return results

    async def aclose(self) -> None:
        return None
