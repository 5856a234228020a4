"""Recipients' preferences: checked and normalised, then stored as ``RecipientPreferences`` bytes.

Checking returns every ``Problem`` found, each naming its field as a path from the request
(``preferences.push_targets[1].web_push.auth``), never echoing the value: most fields are personal
data. What passes is normalised: phone numbers to E.164, email domains to IDNA 2008 A-labels in lower
case, region codes to upper case, an empty time zone to the one the phone, region or locale suggest
(``engine.zone_guess``), marked ``time_zone_guessed`` and guessed again when they change; a zone the
recipient gave stays until an update names ``time_zone``.

Storage: one key per recipient, ``keys.preferences(shard, recipient_id)``. An update is a
read-merge-write under ``WATCH``, so two concurrent partial updates (different field masks) never
lose each other's fields.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence

import idna
import phonenumbers
from google.protobuf import field_mask_pb2
from redis.asyncio import Redis
from redis.exceptions import WatchError
from relais.v1 import preferences_pb2, types_pb2

from channels.http_common import url_parts
from common import keys
from common.quiet_hours import MINUTES_PER_DAY
from engine.state import ConflictError
from engine.turns import Turns
from engine.validation import Problem
from engine.zone_guess import guess_zone, known_zones

RecipientPreferences = preferences_pb2.RecipientPreferences

MAX_RECIPIENT_ID = 128
MAX_PUSH_TARGETS = 20
MAX_EMAIL = 254  # RFC 5321 path limit, of the address as sent (domain encoded)
MAX_EMAIL_LOCAL = 64
MAX_DOMAIN = 253  # RFC 1035, in A-labels
# Bounds the work of checking an address as given: its domain's encoded form may be longer or shorter.
MAX_EMAIL_INPUT = 1024
MAX_TOKEN = 4096
MAX_URL = 2048
_P = "preferences."

_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: it ends up in a Redis key
# RFC 5322 dot-atom local part (no quoted strings: no mail system of ours needs them).
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# BCP 47 language[-script][-region][-variant...]: what message catalogues are keyed by.
_LOCALE = re.compile(
    r"(?P<lang>[A-Za-z]{2,3})(-(?P<script>[A-Za-z]{4}))?(-(?P<region>[A-Za-z]{2}|[0-9]{3}))?"
    r"(?P<variants>(-([A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*)"
)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_BUNDLE = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_CHANNELS = frozenset(types_pb2.Channel.values()) - {types_pb2.CHANNEL_UNSPECIFIED}
_KINDS = frozenset(types_pb2.NoticeKind.values()) - {types_pb2.NOTICE_KIND_UNSPECIFIED}


class InvalidPreferencesError(ValueError):
    """Preferences that cannot be stored; ``problems`` name the fields."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(p.reason for p in problems))
        self.problems = tuple(problems)


# --- checks ------------------------------------------------------------------------------------------


def check_recipient_id(recipient_id: str, name: str = "recipient_id") -> Problem | None:
    if not recipient_id:
        return Problem(name, f"{name} is required")
    if len(recipient_id) > MAX_RECIPIENT_ID or not _ID.fullmatch(recipient_id):
        return Problem(name, f"{name} must be 1 to {MAX_RECIPIENT_ID} printable ASCII characters")
    return None


def normalise_locale(locale: str) -> str | None:
    """``fr-ch`` → ``fr-CH``; None when it is not a BCP 47 language tag of the usual shape."""
    match = _LOCALE.fullmatch(locale)
    if match is None:
        return None
    parts = [match["lang"].lower()]
    if match["script"]:
        parts.append(match["script"].title())
    if match["region"]:
        parts.append(match["region"].upper())
    parts.extend(v.lower() for v in match["variants"].split("-") if v)
    return "-".join(parts)


def normalise_email(email: str) -> str | None:
    """The address with its domain as IDNA 2008 A-labels in lower case (``anna@straße.de`` →
    ``anna@xn--strae-oqa.de``: what is stored and given to SMTP), or None when it is not one."""
    if len(email) > MAX_EMAIL_INPUT or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in email):
        return None
    local, at, domain = email.rpartition("@")
    if not at or not local or len(local) > MAX_EMAIL_LOCAL or not _LOCAL.fullmatch(local):
        return None
    try:
        # UTS 46 non-transitional, as browsers and mail clients read the domain: "ß" stays itself
        # (IDNA 2003 made it "ss", another registrable domain), and a joiner IDNA 2008 forbids is
        # refused, not dropped.
        ascii_domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError:
        return None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    address = f"{local}@{ascii_domain}"
    # The limits hold for what is sent, the encoded form (an A-label is longer than its U-label).
    return address if len(ascii_domain) <= MAX_DOMAIN and len(address) <= MAX_EMAIL else None


def normalise_phone(phone: str, region: str) -> tuple[str | None, str]:
    """``(E.164, "")``, or ``(None, why)`` naming what is wrong without repeating the number."""
    if not phone.startswith("+") and not region:
        return None, "phone has no country code (+...) and region is not set"
    try:
        number = phonenumbers.parse(phone, region or None)
    except phonenumbers.NumberParseException:
        return None, "phone is not a phone number"
    if not phonenumbers.is_valid_number(number):
        return None, "phone is not a valid phone number"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""


def _base64url_bytes(value: str) -> bytes | None:
    if not _BASE64URL.fullmatch(value):
        return None
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        return None


def _push_target_problems(target: preferences_pb2.PushTarget, path: str) -> Iterator[Problem]:
    which = target.WhichOneof("target")
    if which == "fcm":
        token = target.fcm.token
        if not token or len(token) > MAX_TOKEN or not _ID.fullmatch(token):
            yield Problem(f"{path}.fcm.token", f"{path}.fcm.token must be a non-empty FCM token")
    elif which == "web_push":
        yield from _web_push_problems(target.web_push, f"{path}.web_push")
    elif which == "apns":
        token = target.apns.device_token
        if not (64 <= len(token) <= 200 and len(token) % 2 == 0 and _HEX.fullmatch(token)):
            yield Problem(f"{path}.apns.device_token", f"{path}.apns.device_token must be a hex token")
        if len(target.apns.bundle_id) > 255 or not _BUNDLE.fullmatch(target.apns.bundle_id):
            yield Problem(f"{path}.apns.bundle_id", f"{path}.apns.bundle_id must be a bundle id")
    else:
        yield Problem(path, f"{path} names no push service (fcm, apns or web_push)")


def _web_push_endpoint_ok(endpoint: str) -> bool:
    """An https URL the Web Push channel can send to. One it could not (a port that is no number
    from 1 to 65535, brackets that do not close, a host IDNA refuses such as ``xn--``) would be
    stored, then fail at every send."""
    if len(endpoint) > MAX_URL or any(c.isspace() for c in endpoint):
        return False
    url = url_parts(endpoint)
    if url is None or url.scheme != "https" or not url.hostname:
        return False
    try:
        # An IPv6 address (between brackets, checked by url_parts) is no name for IDNA to judge.
        if ":" not in url.hostname:
            idna.encode(url.hostname, uts46=True)
    except idna.IDNAError:
        return False
    return True


def _web_push_problems(sub: preferences_pb2.WebPushTarget, path: str) -> Iterator[Problem]:
    if not _web_push_endpoint_ok(sub.endpoint):
        yield Problem(f"{path}.endpoint", f"{path}.endpoint must be an https URL")
    key = _base64url_bytes(sub.p256dh)
    # An uncompressed P-256 point: 0x04, then 32 bytes of x and 32 of y.
    if key is None or len(key) != 65 or key[0] != 4:
        yield Problem(f"{path}.p256dh", f"{path}.p256dh must be a base64url P-256 public key")
    auth = _base64url_bytes(sub.auth)
    if auth is None or len(auth) != 16:
        yield Problem(f"{path}.auth", f"{path}.auth must be a base64url 16-byte secret")


def _enum_problems(values: Sequence[int], allowed: frozenset[int], name: str, what: str) -> Iterator[Problem]:
    if any(v not in allowed for v in values):
        yield Problem(name, f"{name} holds a value that is not a {what}")
    elif len(set(values)) != len(values):
        yield Problem(name, f"{name} names a value twice")


def _contact_problems(prefs: RecipientPreferences, out: RecipientPreferences) -> Iterator[Problem]:
    region_ok = True
    if prefs.region:
        region = prefs.region.upper()
        region_ok = region in phonenumbers.SUPPORTED_REGIONS
        if region_ok:
            out.region = region
        else:
            yield Problem(_P + "region", _P + "region must be an ISO 3166-1 alpha-2 code, e.g. CH")
    if prefs.email:
        email = normalise_email(prefs.email)
        if email is None:
            yield Problem(_P + "email", _P + "email is not a valid email address")
        else:
            out.email = email
    if prefs.phone and region_ok:  # with a bad region the number cannot be judged
        phone, why = normalise_phone(prefs.phone, out.region)
        if phone is None:
            yield Problem(_P + "phone", _P + why)
        else:
            out.phone = phone
    if len(prefs.push_targets) > MAX_PUSH_TARGETS:
        yield Problem(_P + "push_targets", f"{_P}push_targets: at most {MAX_PUSH_TARGETS}")
    for i, target in enumerate(prefs.push_targets):
        yield from _push_target_problems(target, f"{_P}push_targets[{i}]")


def _setting_problems(prefs: RecipientPreferences, out: RecipientPreferences) -> Iterator[Problem]:
    if prefs.locale:
        locale = normalise_locale(prefs.locale)
        if locale is None:
            yield Problem(_P + "locale", _P + 'locale must be a BCP 47 language tag, e.g. "fr-CH"')
        else:
            out.locale = locale
    out.time_zone_guessed = not prefs.time_zone  # output only: what the input says is ignored
    if not prefs.time_zone:
        # Times shown and quiet hours in UTC would be an hour or two off for most recipients.
        out.time_zone = guess_zone(phone=out.phone, region=out.region, locale=out.locale)
    elif prefs.time_zone not in known_zones():
        yield Problem(_P + "time_zone", _P + 'time_zone must be an IANA time zone, e.g. "Europe/Zurich"')
    for name in ("start_minute", "end_minute"):
        if getattr(prefs.quiet_hours, name) >= MINUTES_PER_DAY:
            path = f"{_P}quiet_hours.{name}"
            yield Problem(path, f"{path} must be 0 to {MINUTES_PER_DAY - 1}")
    yield from _enum_problems(prefs.channel_order, _CHANNELS, _P + "channel_order", "channel")
    yield from _enum_problems(prefs.muted_kinds, _KINDS, _P + "muted_kinds", "notice kind")


def validate(prefs: RecipientPreferences) -> RecipientPreferences:
    """The normalised copy of ``prefs``; ``InvalidPreferencesError`` listing every bad field."""
    out = RecipientPreferences()
    out.CopyFrom(prefs)
    problems = [
        p
        for p in (
            check_recipient_id(prefs.recipient_id, _P + "recipient_id"),
            *_contact_problems(prefs, out),
            *_setting_problems(prefs, out),
        )
        if p is not None
    ]
    if problems:
        raise InvalidPreferencesError(problems)
    return out


def merge(
    stored: RecipientPreferences | None, update: RecipientPreferences, mask: field_mask_pb2.FieldMask
) -> RecipientPreferences:
    """The preferences after an update: ``update`` whole for an empty mask, else the masked fields of
    ``update`` over ``stored``. A path that is not a field is a ``Problem`` naming ``update_mask``.

    A stored zone that was guessed (``time_zone_guessed``) is dropped unless the mask names
    ``time_zone``, so that ``validate`` guesses it again from the new phone, region and locale; a
    zone the recipient gave is kept, whatever it equals."""
    if not mask.paths:
        return update
    if not mask.IsValidForDescriptor(RecipientPreferences.DESCRIPTOR):
        raise InvalidPreferencesError(
            [Problem("update_mask", "update_mask names a path that is not a field of RecipientPreferences")]
        )
    merged = RecipientPreferences()
    if stored is not None:
        merged.CopyFrom(stored)
    # Masked message and repeated fields are replaced, not merged: a new push target list is the list.
    mask.MergeMessage(update, merged, replace_message_field=True, replace_repeated_field=True)
    merged.recipient_id = update.recipient_id
    if stored is not None and "time_zone" not in mask.paths and _zone_was_guessed(stored):
        merged.time_zone = ""
    return merged


def _zone_was_guessed(prefs: RecipientPreferences) -> bool:
    if prefs.HasField("time_zone_guessed"):
        return prefs.time_zone_guessed
    # Stored before the mark existed: a guess is recognised as the zone the rest of the preferences
    # give. A recipient who chose exactly that zone is taken for one who gave none, once: the update
    # stores the mark.
    return prefs.time_zone == guess_zone(phone=prefs.phone, region=prefs.region, locale=prefs.locale)


# --- storage -----------------------------------------------------------------------------------------

# Merges retried when another update of the same recipient landed in between: a person's preferences
# change a few times a year, so this many in a row is a runaway client, not contention to wait out.
MAX_WATCH_ATTEMPTS = 16


class PreferenceStore:
    """Preferences in Redis, one key per recipient, shard-tagged by the recipient id."""

    def __init__(self, redis: Redis, shards: int) -> None:
        self._redis = redis
        self._shards = shards
        # Updates of one recipient in this process take turns: a burst of them (a merchant's import,
        # a retrying client) would otherwise overtake each other's WATCH until one gives up. WATCH
        # stays the guard between processes, where such bursts are spread out.
        self._turns = Turns()

    def key(self, recipient_id: str) -> str:
        return keys.preferences(keys.shard_of(recipient_id, self._shards), recipient_id)

    async def get(self, recipient_id: str) -> RecipientPreferences | None:
        raw = await self._redis.get(self.key(recipient_id))
        return None if raw is None else RecipientPreferences.FromString(raw)

    async def update(
        self, update: RecipientPreferences, mask: field_mask_pb2.FieldMask
    ) -> tuple[RecipientPreferences, bool]:
        """Merge, validate and store; ``(stored, changed)``. Raises ``InvalidPreferencesError``, or
        ``ConflictError`` when other updates of the recipient kept landing in between."""
        problem = check_recipient_id(update.recipient_id, _P + "recipient_id")
        if problem is not None:
            raise InvalidPreferencesError([problem])
        key = self.key(update.recipient_id)
        async with self._turns.one(key), self._redis.pipeline(transaction=True) as pipe:
            for _attempt in range(MAX_WATCH_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    stored = None if raw is None else RecipientPreferences.FromString(raw)
                    new = validate(merge(stored, update, mask))
                    if new == stored:
                        return new, False  # leaving the block resets the pipeline, unwatching
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, new.SerializeToString())
                    await pipe.execute()
                    return new, True
                except WatchError:
                    continue  # another update landed between the read and the write: merge again
        raise ConflictError(f"preferences changed {MAX_WATCH_ATTEMPTS} times during one update; retry")

    async def erase(self, recipient_id: str) -> bool:
        """Delete the recipient's preferences; whether there were any."""
        return bool(await self._redis.delete(self.key(recipient_id)))
