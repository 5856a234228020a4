"""Pure helpers both push channels need: collapse identifiers within each service's limits, and a
message's remaining time to live."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime

from channels.jose import b64url

# RFC 8030 §5.4: a Topic is at most 32 characters of the URL-safe base64 alphabet.
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
# APNs refuses an apns-collapse-id longer than 64 bytes.
_APNS_COLLAPSE_MAX_BYTES = 64
# FCM refuses an android.ttl or a webpush TTL above 28 days (400 INVALID_ARGUMENT); Web Push services
# keep messages no longer than that either (RFC 8030 §5.2 lets them shorten a TTL).
MAX_TTL_S = 2_419_200


def _digest(key: str) -> str:
    # 24 bytes of SHA-256 are 32 base64url characters: stable, and collision-free in practice.
    return b64url(hashlib.sha256(key.encode("utf-8")).digest()[:24])


def webpush_topic(collapse_key: str) -> str:
    """The key itself when it is a valid Topic, else a stable 32-character hash of it."""
    return collapse_key if _TOPIC_RE.fullmatch(collapse_key) else _digest(collapse_key)


def apns_collapse_id(collapse_key: str) -> str:
    fits = len(collapse_key.encode("utf-8")) <= _APNS_COLLAPSE_MAX_BYTES
    return collapse_key if fits else _digest(collapse_key)


def ttl_s(expires_at: datetime | None, now_s: float) -> int | None:
    """Whole seconds left before ``expires_at`` (0 when past, at most ``MAX_TTL_S``), None when there
    is no expiry."""
    if expires_at is None:
        return None
    return min(MAX_TTL_S, max(0, math.floor(expires_at.timestamp() - now_s)))
