"""Who is calling, and what they may touch.

Callers present ``authorization: Bearer <key>``; the keys file (``RELAIS_KEYS_FILE``) holds one JSON
object per line, ``{"sha256": "<hex of the key>", "principal": "merchant:acme"}``: keys are stored
hashed, so the file is no secret worth stealing. Each key is bound to a principal:

- ``carrier:<code>`` — TrackingService only, and only events whose ``carrier`` is its code;
- ``merchant:<id>`` — ParcelService, PreferenceService, AlertService, for its own data only;
- ``operator`` — everything.

The coarse rule (which services) is applied by the interceptor (``engine.interceptors``); the fine
rules are the helpers below, which servicers call with the request's fields. Authorisation always
comes from the principal, never from the request body.

Rules servicers apply (documented choices):

- A merchant's recipients are namespaced: merchant ``acme`` may register parcels for, and read,
  update or erase the preferences of, recipient ids starting with ``acme/`` only. It is checked
  without a Redis read, and a merchant cannot address (or spam) another merchant's recipients.
- A parcel, or an alert, of another merchant is reported NOT_FOUND, not PERMISSION_DENIED: a
  merchant cannot read which tracking numbers other merchants ship, nor anything about them. Only
  registering one says it is taken (rejected by index, "registered by another merchant"): a parcel
  cannot be taken over, and a merchant whose number collides must learn why it was refused.
- A carrier's event for another carrier code is rejected by index (REJECT_CODE_PERMISSION_DENIED);
  the rest of the batch applies. So is its event for a parcel another carrier carries (the one the
  merchant registered, else the first to scan it): field ``parcel_id``.

When no keys file is configured there is no principal (``current_principal()`` is None) and every
helper allows everything: that mode is only accepted on a loopback listener (``check_open_listener``).
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from relais.v1 import alerts_pb2, parcel_pb2, preferences_pb2, tracking_pb2

from common.errors import SettingsError

TRACKING = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name
PARCELS = parcel_pb2.DESCRIPTOR.services_by_name["ParcelService"].full_name
PREFERENCES = preferences_pb2.DESCRIPTOR.services_by_name["PreferenceService"].full_name
ALERTS = alerts_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name

# Health checks and reflection answer anyone: load balancers and grpcurl carry no key.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

BEARER = "bearer "


class PrincipalKind(enum.StrEnum):
    CARRIER = "carrier"
    MERCHANT = "merchant"
    OPERATOR = "operator"


SERVICES_BY_KIND: dict[PrincipalKind, frozenset[str]] = {
    PrincipalKind.CARRIER: frozenset({TRACKING}),
    PrincipalKind.MERCHANT: frozenset({PARCELS, PREFERENCES, ALERTS}),
    PrincipalKind.OPERATOR: frozenset({TRACKING, PARCELS, PREFERENCES, ALERTS}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: ``carrier:<code>``, ``merchant:<id>`` or ``operator``."""

    kind: PrincipalKind
    ident: str = ""

    def __post_init__(self) -> None:
        if (self.kind is PrincipalKind.OPERATOR) != (self.ident == ""):
            raise ValueError(f"principal {self.kind.value!r} with id {self.ident!r}")
        if any(ch.isspace() or ch in ":/" for ch in self.ident) or len(self.ident) > 64:
            raise ValueError(
                f"principal id {self.ident!r} must be up to 64 characters without ':', '/', space"
            )

    @classmethod
    def parse(cls, text: str) -> Principal:
        kind, _, ident = text.partition(":")
        try:
            return cls(PrincipalKind(kind), ident)
        except ValueError:
            raise ValueError(f"{text!r} is not carrier:<code>, merchant:<id> or operator") from None

    def __str__(self) -> str:
        return self.kind.value if self.kind is PrincipalKind.OPERATOR else f"{self.kind.value}:{self.ident}"

    def may_call(self, service: str) -> bool:
        return service in SERVICES_BY_KIND[self.kind]


# Set by the interceptor inside each call's handler; grpc.aio runs a call in one task, so servicers
# read the principal of their own call.
_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "relais_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the current RPC; None when the server runs without authentication."""
    return _principal.get()


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _principal.set(principal)


def unbind_principal(token: contextvars.Token[Principal | None]) -> None:
    _principal.reset(token)


# --- fine rules, called by servicers ------------------------------------------------------------------


def can_post_for_carrier(carrier: str, principal: Principal | None = None) -> bool:
    """May the caller post an event whose ``carrier`` field is ``carrier``?"""
    who = principal if principal is not None else current_principal()
    if who is None or who.kind is PrincipalKind.OPERATOR:
        return True
    return who.kind is PrincipalKind.CARRIER and hmac.compare_digest(who.ident, carrier)


def confined_carrier(principal: Principal | None = None) -> str | None:
    """The carrier whose parcels alone the caller's events may change (a parcel nobody carries yet
    included); None when any parcel. A carrier is confined to its own: tracking numbers are unique
    per carrier only, and another carrier's key must not deliver, cancel or re-slot them. Hand-overs
    between carriers under one tracking number (postal items crossing a border) come through an
    operator's feed."""
    who = principal if principal is not None else current_principal()
    return who.ident if who is not None and who.kind is PrincipalKind.CARRIER else None


def can_access_merchant(merchant_id: str, principal: Principal | None = None) -> bool:
    """May the caller register, read or acknowledge data of ``merchant_id``?"""
    who = principal if principal is not None else current_principal()
    if who is None or who.kind is PrincipalKind.OPERATOR:
        return True
    return who.kind is PrincipalKind.MERCHANT and who.ident == merchant_id


def can_access_recipient(recipient_id: str, principal: Principal | None = None) -> bool:
    """May the caller name ``recipient_id``? Merchants only their namespace ``<merchant_id>/...``."""
    who = principal if principal is not None else current_principal()
    if who is None or who.kind is PrincipalKind.OPERATOR:
        return True
    return who.kind is PrincipalKind.MERCHANT and recipient_id.startswith(who.ident + "/")


def merchant_scope(requested_merchant_id: str, principal: Principal | None = None) -> str | None:
    """The merchant id a listing or stats call is confined to.

    Operators (and the open mode) get what they asked for ("" = all); a merchant gets its own id when
    it asked for its own or for none; anything else is None: PERMISSION_DENIED.
    """
    who = principal if principal is not None else current_principal()
    if who is None or who.kind is PrincipalKind.OPERATOR:
        return requested_merchant_id
    if who.kind is PrincipalKind.MERCHANT and requested_merchant_id in ("", who.ident):
        return who.ident
    return None


# --- keys ---------------------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random API key: 256 bits, URL-safe, with a prefix that secret scanners can match."""
    return "rlk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class KeyStore:
    """The hashed keys of the keys file: (hex digest as bytes, principal)."""

    entries: tuple[tuple[bytes, Principal], ...]

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise SettingsError(f"RELAIS_KEYS_FILE={str(path)!r} cannot be read: {exc.strerror}") from None
        return cls(tuple((digest.encode(), principal) for digest, principal in _parse_lines(path, lines)))

    def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, or None for an unknown key.

        Every stored digest is compared in constant time, without stopping at a match, so the time
        taken says nothing about which key (or how much of one) matched. Keys files hold tens of
        keys, so the scan costs microseconds.
        """
        digest = hash_key(key).encode()
        found: Principal | None = None
        for stored, principal in self.entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def _parse_lines(path: Path, lines: Iterable[str]) -> Iterable[tuple[str, Principal]]:
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"RELAIS_KEYS_FILE {path}:{number}"
        try:
            entry = json.loads(text)
            digest = str(entry["sha256"]).lower()
            principal = Principal.parse(str(entry["principal"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SettingsError(
                f'{where}: expected {{"sha256": "<hex>", "principal": "..."}}: {exc}'
            ) from None
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise SettingsError(f"{where}: sha256 must be 64 hex digits")
        yield digest, principal


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` header, if the call carries one."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER) :].strip()
    return None


def add_key(path: Path, principal: Principal) -> str:
    """Create a key for ``principal``, append its hash to the keys file and return the key (shown once)."""
    key = new_key()
    line = json.dumps({"sha256": hash_key(key), "principal": str(principal)}) + "\n"
    # Append-only and owner-readable: concurrent adds never interleave a line, others cannot read it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return key


# --- listener -----------------------------------------------------------------------------------------


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open_listener(listen: str, keys_file: Path | None) -> None:
    """Without keys, anyone who reaches the port may do anything: only a loopback address is allowed."""
    if keys_file is None and not is_loopback(listen):
        raise SettingsError(
            f"RELAIS_LISTEN={listen!r} is not a loopback address and RELAIS_KEYS_FILE is not set: "
            "refusing to serve without authentication (create keys with `relais keys add`)"
        )


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS for the listener when a certificate is configured; with a client CA, mutual TLS (a client
    certificate signed by that CA is required before any RPC)."""
    if cert is None or key is None:
        return None
    root = client_ca.read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def describe_listener(tls_cert: Path | None, tls_client_ca: Path | None, keys_file: Path | None) -> str:
    """For the start-up line: how callers are authenticated."""
    transport = "mutual TLS" if tls_client_ca else "TLS" if tls_cert else "plaintext"
    callers = f"API keys from {keys_file}" if keys_file else "no authentication: loopback only"
    return f"{transport}, {callers}"
