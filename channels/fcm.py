"""Push through Firebase Cloud Messaging, HTTP v1 API.

Authentication is a Google service account: an RS256 JWT assertion signed with its key is exchanged
at its ``token_uri`` for an OAuth2 access token (grant type jwt-bearer), which is cached until shortly
before it expires. Each message is one ``POST /v1/projects/{project}/messages:send``.

Options (``RELAIS_CHANNEL_FCM_<OPTION>``): ``service_account_file`` (required: the JSON key file,
which gives ``private_key``, ``client_email``, ``project_id`` and ``token_uri``), ``project_id`` and
``token_uri`` (override the file's), ``api_base`` (``https://fcm.googleapis.com``), ``max_concurrency``
(16), ``timeout_s`` (10).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from channels.base import (
    Accepted,
    FcmToken,
    Message,
    PermanentFailure,
    SendResult,
    TransientFailure,
    configuration_problem,
)
from channels.http_common import new_client, send_bounded, status_failure, transport_failure
from channels.jose import sign_rs256
from channels.options import Options
from channels.push_common import apns_collapse_id, ttl_s, webpush_topic

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_API_BASE = "https://fcm.googleapis.com"
# Google accepts assertions valid for at most an hour.
ASSERTION_LIFETIME_S = 3600
# Renew the access token this long before it expires, so no request carries a token that dies in flight.
TOKEN_REFRESH_MARGIN_S = 120.0
# errorCode values that condemn the token: the app was uninstalled / the token belongs to another sender.
_DEAD_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
# 401 with this errorCode: APNs or the Web Push service refused the project's certificate or key, which
# the operator uploads to Firebase; neither the device's fault nor our access token's.
_THIRD_PARTY_AUTH = "THIRD_PARTY_AUTH_ERROR"
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    private_key_id: str
    project_id: str
    token_uri: str

    @classmethod
    def from_file(cls, path: Path) -> ServiceAccount:
        """Raises ValueError (naming the field, never its content) for a malformed key file."""
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ValueError("is not a readable JSON file") from None
        missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        try:
            key = load_pem_private_key(info["private_key"].encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError("has an unreadable private_key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("private_key is not an RSA key")
        return cls(
            client_email=info["client_email"],
            private_key=key,
            private_key_id=info.get("private_key_id", ""),
            project_id=info.get("project_id", ""),
            token_uri=info["token_uri"],
        )

    def assertion(self, now_s: float, *, token_uri: str) -> str:
        issued_s = int(now_s)
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": token_uri,
            "iat": issued_s,
            "exp": issued_s + ASSERTION_LIFETIME_S,
        }
        return sign_rs256(self.private_key, claims, kid=self.private_key_id)


@dataclass(frozen=True, slots=True)
class FcmConfig:
    account: ServiceAccount
    project_id: str
    token_uri: str
    api_base: str = DEFAULT_API_BASE
    max_concurrency: int = 16
    timeout_s: float = 10.0

    @property
    def send_path(self) -> str:
        return f"/v1/projects/{self.project_id}/messages:send"


def config_from_options(options: Mapping[str, str]) -> FcmConfig:
    opts = Options("fcm", options)
    path = opts.file("service_account_file", required=True)
    assert path is not None
    try:
        account = ServiceAccount.from_file(path)
    except ValueError as exc:
        raise opts.error("service_account_file", str(exc)) from None
    project_id = opts.text("project_id", account.project_id)
    if not project_id:
        raise opts.error("project_id", "is required (the key file names none)")
    config = FcmConfig(
        account=account,
        project_id=project_id,
        token_uri=opts.text("token_uri", account.token_uri),
        api_base=opts.text("api_base", DEFAULT_API_BASE).rstrip("/"),
        max_concurrency=opts.integer("max_concurrency", 16, low=1, high=1024),
        timeout_s=opts.number("timeout_s", 10.0, low=0.1, high=600.0),
    )
    opts.finish()
    return config


class _NoAccessTokenError(Exception):
    """The token endpoint refused or failed; carries the result every waiting message gets."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(getattr(result, "reason", "no access token"))
        self.result = result


class AccessTokens:
    """The OAuth2 access token, fetched once and shared by concurrent sends until near expiry."""

    def __init__(self, config: FcmConfig, client: httpx.AsyncClient, now_s: Callable[[], float]) -> None:
        self._config = config
        self._client = client
        self._now_s = now_s
        self._token = ""
        self._expires_s = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    def _fresh(self) -> bool:
        return bool(self._token) and self._now_s() < self._expires_s - TOKEN_REFRESH_MARGIN_S

    def invalidate(self) -> None:
        self._token = ""

    async def get(self) -> str:
        if self._fresh():
            return self._token
        async with self._lock:
            if not self._fresh():
                await self._fetch()
            return self._token

    async def _fetch(self) -> None:
        now_s = self._now_s()
        assertion = self._config.account.assertion(now_s, token_uri=self._config.token_uri)
        self.fetches += 1
        try:
            response = await self._client.post(
                self._config.token_uri, data={"grant_type": GRANT_TYPE, "assertion": assertion}
            )
        except httpx.HTTPError as exc:
            raise _NoAccessTokenError(transport_failure("fcm token", exc)) from None
        if response.status_code != 200:
            raise _NoAccessTokenError(token_failure(response))
        try:
            payload = response.json()
            token, expires_in_s = str(payload["access_token"]), float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise _NoAccessTokenError(TransientFailure("fcm token: malformed token response")) from None
        self._token, self._expires_s = token, now_s + expires_in_s


def token_failure(response: httpx.Response) -> SendResult:
    """A refusal from the token endpoint concerns the service account, never a recipient."""
    result = status_failure("fcm token", response, _oauth_error(response))
    if isinstance(result, PermanentFailure):
        # invalid_grant (RFC 6749 §5.2): a deleted or wrong key, or a clock more than minutes off.
        return configuration_problem(f"{result.reason}: check the service account key and the clock")
    return result


def _oauth_error(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", "")
    except (ValueError, AttributeError):
        return ""
    return error if isinstance(error, str) else ""


def message_body(message: Message, token: str, now_s: float) -> dict[str, Any]:
    """The HTTP v1 ``{"message": ...}`` document for one token (pure)."""
    body: dict[str, Any] = {
        "token": token,
        "notification": {"title": message.subject, "body": message.text},
        # The key rides along so the app can drop a duplicate after an at-least-once resend.
        "data": {**message.data, "idempotency_key": message.idempotency_key},
    }
    android: dict[str, str] = {}
    apns: dict[str, str] = {}
    webpush: dict[str, str] = {}
    if message.collapse_key:
        android["collapse_key"] = message.collapse_key
        apns["apns-collapse-id"] = apns_collapse_id(message.collapse_key)
        webpush["Topic"] = webpush_topic(message.collapse_key)
    ttl = ttl_s(message.expires_at, now_s)
    if ttl is not None and message.expires_at is not None:
        android["ttl"] = f"{ttl}s"
        apns["apns-expiration"] = str(int(message.expires_at.timestamp()))
        webpush["TTL"] = str(ttl)
    if android:
        body["android"] = android
    if apns:
        body["apns"] = {"headers": apns}
    if webpush:
        body["webpush"] = {"headers": webpush}
    return {"message": body}


@dataclass(frozen=True, slots=True)
class FcmErrorBody:
    """What an error body says: its status, the FCM errorCode, whether a field violation names the token."""

    status: str = ""
    error_code: str = ""
    on_token: bool = False

    @classmethod
    def of(cls, response: httpx.Response) -> FcmErrorBody:
        try:
            error = response.json()["error"]
            status, details = str(error.get("status", "")), list(error.get("details", []))
            message = str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls()
        error_code = ""
        on_token = "registration token" in message.lower()
        for detail in details:
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == _FCM_ERROR_TYPE:
                error_code = str(detail.get("errorCode", ""))
            if detail.get("@type") == _BAD_REQUEST_TYPE:
                fields = [v.get("field") for v in detail.get("fieldViolations", []) if isinstance(v, dict)]
                on_token = on_token or "message.token" in fields
        return cls(status, error_code, on_token)

    @property
    def expired_access_token(self) -> bool:
        """A 401 without an errorCode: the access token was revoked or expired early."""
        return not self.error_code


def fcm_failure(response: httpx.Response, error: FcmErrorBody) -> SendResult:
    label = error.error_code or error.status
    reason = f"fcm: HTTP {response.status_code}{f' {label}' if label else ''}"
    code = response.status_code
    # FCM condemns a token with UNREGISTERED (404), SENDER_ID_MISMATCH (403) or INVALID_ARGUMENT (400)
    # naming the token; nothing else says anything about the device.
    if error.error_code in _DEAD_TOKEN_CODES or (code == 400 and error.on_token):
        return PermanentFailure(reason, destination_invalid=True)
    if error.error_code == _THIRD_PARTY_AUTH:
        return configuration_problem(f"{reason}: APNs or Web Push refused the project's certificate or key")
    if code == 401:
        # The channel dropped its access token (expired_access_token) and fetches a new one on the retry.
        return TransientFailure(reason)
    if code == 403:
        # PERMISSION_DENIED: the service account lacks the role, or the API is off for the project.
        return configuration_problem(f"{reason}: the service account may not send for project_id")
    if code == 404:
        # A bare 404 is a wrong project_id or api_base ("Requested entity was not found"): the same
        # for every token, so it must not delete them.
        return configuration_problem(f"{reason}: no FCM project at project_id/api_base")
    return status_failure("fcm", response, label)


class FcmChannel:
    name = "fcm"

    def __init__(
        self,
        config: FcmConfig,
        *,
        now_s: Callable[[], float] = time.time,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._now_s = now_s
        self._client = new_client(
            base_url=config.api_base,
            timeout_s=config.timeout_s,
            max_connections=config.max_concurrency,
            tls_context=tls_context,
        )
        self.tokens = AccessTokens(config, self._client, now_s)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(config_from_options(options))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        return await send_bounded(self.name, messages, self._send_one, self.config.max_concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send_one(self, message: Message) -> SendResult:
        if not isinstance(message.to, FcmToken):
            return PermanentFailure(f"fcm: cannot reach a {type(message.to).__name__}")
        if not message.to.token:
            return PermanentFailure("fcm: empty token", destination_invalid=True)
        now_s = self._now_s()
        if message.expires_at is not None and ttl_s(message.expires_at, now_s) == 0:
            return PermanentFailure("fcm: expired before sending")
        try:
            access_token = await self.tokens.get()
        except _NoAccessTokenError as exc:
            return exc.result
        try:
            response = await self._client.post(
                self.config.send_path,
                json=message_body(message, message.to.token, now_s),
                headers={"Authorization": f"Bearer {access_token}"},
            )
        except httpx.HTTPError as exc:
            return transport_failure("fcm", exc)
        if response.status_code == 200:
            return Accepted(provider_message_id=_message_name(response))
        error = FcmErrorBody.of(response)
        if response.status_code == 401 and error.expired_access_token:
            self.tokens.invalidate()
        return fcm_failure(response, error)


def _message_name(response: httpx.Response) -> str:
    try:
        return str(response.json().get("name", ""))
    except (ValueError, AttributeError):
        return ""
