"""Settings: the only place that reads the environment.

Every knob is a ``RELAIS_*`` variable (plus ``REDIS_URL`` and the standard ``OTEL_*`` ones). They are
read once, at start, into a frozen ``Settings`` validated on construction: a bad value stops the
process with a message that names the variable, before anything listens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import SettingsError

CHANNEL_PREFIX = "RELAIS_CHANNEL_"


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range ({low} to {high})")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range ({low} to {high})")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def _listen(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{name}={value!r} is not host:port (e.g. 127.0.0.1:50051)")
    return value


def _redis_url(env: Mapping[str, str]) -> str | None:
    value = env.get("REDIS_URL") or None
    if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"REDIS_URL={value!r} must start with redis://, rediss:// or unix://")
    return value


def _channel_options(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``RELAIS_CHANNEL_EMAIL_HOST=x`` becomes ``{"email": {"host": "x"}}``."""
    options: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if not key.startswith(CHANNEL_PREFIX):
            continue
        name, sep, option = key[len(CHANNEL_PREFIX) :].partition("_")
        if not sep or not name or not option:
            raise SettingsError(f"{key} should be {CHANNEL_PREFIX}<CHANNEL>_<OPTION>")
        options.setdefault(name.lower(), {})[option.lower()] = value
    return options


def _split(raw: str) -> tuple[str, ...]:
    """``"a, b,"`` → ``("a", "b")``: comma-separated names, blanks dropped."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _names(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    names = _split(env.get(name) or default)
    if not names:
        raise SettingsError(f"{name} names no channel")
    return names


# --- gateway ----------------------------------------------------------------------------------------


def _rates(env: Mapping[str, str], name: str) -> dict[str, float]:
    """``sms=10,fcm=500`` becomes ``{"sms": 10.0, "fcm": 500.0}`` (messages per second per provider)."""
    rates: dict[str, float] = {}
    for part in (env.get(name) or "").split(","):
        if not part.strip():
            continue
        provider, sep, raw = part.partition("=")
        try:
            rate = float(raw)
        except ValueError:
            rate = -1.0
        if not sep or not provider.strip() or not 0 < rate <= 1e7:
            raise SettingsError(f"{name}: {part.strip()!r} should be <provider>=<messages per second>")
        rates[provider.strip().lower()] = rate
    return rates


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's knobs, from ``RELAIS_GATEWAY_*`` variables."""

    # How long one chunk of sends may take; no chunk starts later than half of it into a batch, so a
    # batch's sends end within 1.5 of it (gateway.worker). Another gateway takes over an outbox entry
    # idle for twice as long (its gateway died), and an idempotency claim lasts as long.
    send_timeout_s: float = 30.0
    # Messages handed to a provider at once: a chunk that times out is the most that may go out twice.
    send_chunk: int = 64
    # Attempts per notice before it goes to the dead-letter stream.
    max_attempts: int = 6
    # Exponential backoff between attempts: base * 2^attempt, capped, with full jitter.
    backoff_base_s: float = 30.0
    backoff_max_s: float = 3600.0
    # Outbox entries read per stream and call, and batches processed at once per process.
    batch_size: int = 256
    max_in_flight: int = 4
    # Blocking read: how long XREADGROUP waits for new entries.
    block_ms: int = 200
    # How often crashed gateways' entries are looked for (XAUTOCLAIM).
    reclaim_interval_s: float = 5.0
    # An outbox entry handed out this many times without being settled (its batches kept failing) goes
    # to the dead-letter stream at the next reclaim.
    max_deliveries: int = 5
    # How long a "sent" idempotency key is kept: a resend within it is recognised.
    idempotency_retention_s: int = 7 * 24 * 3600
    # How long a dead letter waits for an operator before it is dropped.
    dead_letter_retention_days: int = 14
    # SMS only for notices worth it: declared value at least this (minor units, any currency)...
    sms_value_threshold_minor: int = 10_000
    # ...and within this many SMS segments per merchant and calendar month (UTC). 0: no SMS.
    sms_monthly_budget_segments: int = 100_000
    # False turns every rate limit off (benchmarks measure the limiter's cost with it).
    limits_enabled: bool = True
    # Provider throughput (messages per second), per provider name; others get the default.
    provider_rate_per_s: float = 1000.0
    provider_rates_per_s: Mapping[str, float] = field(default_factory=dict)
    # Frequency cap per recipient (slot notices and corrections are exempt).
    recipient_rate_per_h: float = 6.0
    recipient_burst: int = 3
    # Per merchant throughput.
    merchant_rate_per_s: float = 500.0
    merchant_burst: int = 1000
    # Merchant template overrides: <dir>/<merchant_id>/<template path> wins over the built-in one.
    templates_dir: Path | None = None
    # Where actionable notices link to (the merchant's or carrier's tracking page).
    link_base: str = "https://track.example"

    def __post_init__(self) -> None:
        if not self.link_base.startswith("https://"):
            raise SettingsError(f"RELAIS_GATEWAY_LINK_BASE={self.link_base!r} must be an https:// URL")
        if self.templates_dir is not None and not self.templates_dir.is_dir():
            raise SettingsError(
                f"RELAIS_GATEWAY_TEMPLATES_DIR={str(self.templates_dir)!r} is not a directory"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise SettingsError("RELAIS_GATEWAY_BACKOFF_MAX_S must be at least RELAIS_GATEWAY_BACKOFF_BASE_S")

    def provider_rate(self, provider: str) -> float:
        return self.provider_rates_per_s.get(provider, self.provider_rate_per_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        p = "RELAIS_GATEWAY_"
        return cls(
            # At least a second: a batch is planned and claimed, and its first chunk rendered, before
            # that chunk goes out, and no chunk starts past half of it: a shorter one can leave every
            # batch unsent.
            send_timeout_s=_float(env, p + "SEND_TIMEOUT_S", cls.send_timeout_s, low=1.0, high=3600.0),
            send_chunk=_int(env, p + "SEND_CHUNK", cls.send_chunk, low=1, high=10_000),
            max_attempts=_int(env, p + "MAX_ATTEMPTS", cls.max_attempts, low=1, high=100),
            backoff_base_s=_float(env, p + "BACKOFF_BASE_S", cls.backoff_base_s, low=0.001, high=86400.0),
            backoff_max_s=_float(env, p + "BACKOFF_MAX_S", cls.backoff_max_s, low=0.001, high=7 * 86400.0),
            batch_size=_int(env, p + "BATCH_SIZE", cls.batch_size, low=1, high=10_000),
            max_in_flight=_int(env, p + "MAX_IN_FLIGHT", cls.max_in_flight, low=1, high=256),
            block_ms=_int(env, p + "BLOCK_MS", cls.block_ms, low=1, high=60_000),
            reclaim_interval_s=_float(
                env, p + "RECLAIM_INTERVAL_S", cls.reclaim_interval_s, low=0.01, high=3600.0
            ),
            max_deliveries=_int(env, p + "MAX_DELIVERIES", cls.max_deliveries, low=2, high=1000),
            idempotency_retention_s=_int(
                env, p + "IDEMPOTENCY_RETENTION_S", cls.idempotency_retention_s, low=60, high=90 * 86400
            ),
            dead_letter_retention_days=_int(
                env, p + "DEAD_LETTER_RETENTION_DAYS", cls.dead_letter_retention_days, low=1, high=3650
            ),
            sms_value_threshold_minor=_int(
                env, p + "SMS_VALUE_THRESHOLD_MINOR", cls.sms_value_threshold_minor, low=0, high=1 << 62
            ),
            sms_monthly_budget_segments=_int(
                env, p + "SMS_MONTHLY_BUDGET_SEGMENTS", cls.sms_monthly_budget_segments, low=0, high=1 << 40
            ),
            limits_enabled=_bool(env, p + "LIMITS_ENABLED", cls.limits_enabled),
            provider_rate_per_s=_float(
                env, p + "PROVIDER_RATE_PER_S", cls.provider_rate_per_s, low=0.001, high=1e7
            ),
            provider_rates_per_s=_rates(env, p + "PROVIDER_RATES_PER_S"),
            recipient_rate_per_h=_float(
                env, p + "RECIPIENT_RATE_PER_H", cls.recipient_rate_per_h, low=0.001, high=1e7
            ),
            recipient_burst=_int(env, p + "RECIPIENT_BURST", cls.recipient_burst, low=1, high=1_000_000),
            merchant_rate_per_s=_float(
                env, p + "MERCHANT_RATE_PER_S", cls.merchant_rate_per_s, low=0.001, high=1e7
            ),
            merchant_burst=_int(env, p + "MERCHANT_BURST", cls.merchant_burst, low=1, high=10_000_000),
            templates_dir=Path(env[p + "TEMPLATES_DIR"]) if env.get(p + "TEMPLATES_DIR") else None,
            link_base=env.get(p + "LINK_BASE") or cls.link_base,
        )


# --- engine: ingest and notice planning ------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """Notice planning and ingest, from ``RELAIS_ENGINE_*`` variables."""

    # A moved slot sends no correction when both its ends moved by this much or less (or it lies
    # inside the slot the recipient was told).
    slot_shift_threshold_s: int = 15 * 60
    # A correction waits this long after the change, so rapid successive changes make one correction.
    correction_debounce_s: int = 120
    # The pickup reminder is due this long before the pickup deadline.
    pickup_reminder_lead_s: int = 24 * 3600
    # Batches of one StreamEvents call applied at once; the stream reads no further until acks drain.
    stream_window: int = 8
    # Parcels that never finish (no event, never delivered) are removed after this many idle days.
    idle_retention_days: int = 180
    # Merchants whose unpaid orders' notices may still carry links that change the delivery
    # (e.g. cash on delivery); every other unpaid order gets informational notices only.
    unpaid_actionable_merchants: frozenset[str] = frozenset()
    # Server processes of ``relais serve``, sharing the listener's port (SO_REUSEPORT): one Python
    # process uses one core, so a multi-core host runs about one per core.
    workers: int = 1
    # With several workers, a new event stream (or a large RecordEvents call) goes to the least loaded
    # one, whichever the kernel handed its connection to (``engine.stream_balance``).
    balance_streams: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EngineSettings:
        p = "RELAIS_ENGINE_"
        return cls(
            slot_shift_threshold_s=_int(
                env, p + "SLOT_SHIFT_THRESHOLD_S", cls.slot_shift_threshold_s, low=0, high=86400
            ),
            correction_debounce_s=_int(
                env, p + "CORRECTION_DEBOUNCE_S", cls.correction_debounce_s, low=0, high=86400
            ),
            pickup_reminder_lead_s=_int(
                env, p + "PICKUP_REMINDER_LEAD_S", cls.pickup_reminder_lead_s, low=60, high=30 * 86400
            ),
            stream_window=_int(env, p + "STREAM_WINDOW", cls.stream_window, low=1, high=1024),
            idle_retention_days=_int(
                env, p + "IDLE_RETENTION_DAYS", cls.idle_retention_days, low=1, high=3650
            ),
            unpaid_actionable_merchants=frozenset(_split(env.get(p + "UNPAID_ACTIONABLE_MERCHANTS", ""))),
            workers=_int(env, p + "WORKERS", cls.workers, low=1, high=256),
            balance_streams=_bool(env, p + "BALANCE_STREAMS", cls.balance_streams),
        )


# --- engine: the scheduler --------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's dispatcher (``engine.scheduler.Dispatcher``), from ``RELAIS_SCHEDULER_*``
    variables; its constructor's defaults are these."""

    # The longest the dispatcher sleeps without a wake-up: every writer of a due set wakes it for a
    # notice due earlier, so this only bounds how late it sees what was scheduled while a wake-up was
    # lost (the channel reconnecting).
    max_idle_s: float = 1.0
    # Timer handlers (the alert checks) run at once; a dispatcher holds 32 times as many due timers,
    # the others wait in the due set.
    timer_concurrency: int = 32
    # How long a timer handler may run, waiting for a slot included; its timer is leased for twice as
    # long, after which another dispatcher (or this one, restarted) runs it again.
    timer_timeout_s: float = 10.0
    # When a timer whose handler failed (or that has no handler here) is tried again.
    timer_retry_ms: int = 30_000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SchedulerSettings:
        p = "RELAIS_SCHEDULER_"
        return cls(
            max_idle_s=_float(env, p + "MAX_IDLE_S", cls.max_idle_s, low=0.01, high=3600.0),
            timer_concurrency=_int(env, p + "TIMER_CONCURRENCY", cls.timer_concurrency, low=1, high=4096),
            timer_timeout_s=_float(env, p + "TIMER_TIMEOUT_S", cls.timer_timeout_s, low=0.01, high=3600.0),
            timer_retry_ms=_int(env, p + "TIMER_RETRY_MS", cls.timer_retry_ms, low=1, high=86_400_000),
        )


# --- alerts -----------------------------------------------------------------------------------------

SMTP_TLS_MODES = ("opportunistic", "starttls", "implicit", "none")


@dataclass(frozen=True)
class AlertSettings:
    """Internal alerts and their digests, from ``RELAIS_ALERTS_*`` variables.

    Per-merchant thresholds and each team's digest destination live in a JSON file (its format is in
    ``engine/alert_rules.py``), read once at start: they change with a merchant's contract, not often,
    and a file under review beats keys nobody remembers setting.
    """

    # The JSON file of per-merchant thresholds and team destinations; None: defaults, no digests.
    config_path: Path | None = None
    # How often the digest sender gathers the alerts opened since the last digest.
    digest_interval_s: float = 900.0
    # Email digests: the SMTP relay and the sender address. Its own relay, not the email channel's:
    # merchants' teams are usually reached through the company's mail, recipients through an ESP.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    email_from: str = "relais-alerts@localhost"
    # How the relay is reached (SMTP_TLS_MODES): STARTTLS when offered suits a local MTA; "starttls"
    # (required) or "implicit" (port 465) for a relay across the network, against the system's CAs or
    # ``smtp_ca_file``. A login is only sent encrypted.
    smtp_tls: str = "opportunistic"
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_ca_file: Path | None = None
    # Webhook and SMTP calls of the digest sender give up after this long (retried next round).
    send_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AlertSettings:
        p = "RELAIS_ALERTS_"
        path = env.get(p + "CONFIG")
        return cls(
            config_path=Path(path) if path else None,
            digest_interval_s=_float(
                env, p + "DIGEST_INTERVAL_S", cls.digest_interval_s, low=0.01, high=7 * 86400.0
            ),
            smtp_host=env.get(p + "SMTP_HOST") or cls.smtp_host,
            smtp_port=_int(env, p + "SMTP_PORT", cls.smtp_port, low=1, high=65535),
            email_from=env.get(p + "EMAIL_FROM") or cls.email_from,
            smtp_tls=env.get(p + "SMTP_TLS") or cls.smtp_tls,
            smtp_username=env.get(p + "SMTP_USERNAME", ""),
            smtp_password=env.get(p + "SMTP_PASSWORD", ""),
            smtp_ca_file=_path(env, p + "SMTP_CA_FILE"),
            send_timeout_s=_float(env, p + "SEND_TIMEOUT_S", cls.send_timeout_s, low=0.01, high=600.0),
        )

    def __post_init__(self) -> None:
        p = "RELAIS_ALERTS_"
        if self.smtp_tls not in SMTP_TLS_MODES:
            modes = ", ".join(SMTP_TLS_MODES)
            raise SettingsError(f"{p}SMTP_TLS={self.smtp_tls!r} must be one of {modes}")
        if bool(self.smtp_username) != bool(self.smtp_password):
            raise SettingsError(f"{p}SMTP_USERNAME and {p}SMTP_PASSWORD go together")
        if self.smtp_username and self.smtp_tls not in ("starttls", "implicit"):
            raise SettingsError(f"a login is sent encrypted only: set {p}SMTP_TLS to starttls or implicit")


# --- security: TLS, API keys, quotas -----------------------------------------------------------------


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise SettingsError(f"{name}={raw!r} is not a readable file")
    return path


@dataclass(frozen=True)
class SecuritySettings:
    """TLS on the listener, API keys and per-caller quotas (``RELAIS_TLS_*``, ``RELAIS_KEYS_FILE``,
    ``RELAIS_QUOTA_*``). Without a keys file the engine runs open, on a loopback address only."""

    # PEM certificate chain and private key of the gRPC listener; both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    tls_client_ca: Path | None = None
    # JSON lines {"sha256": "<hex of key>", "principal": "merchant:acme"}; None: no authentication.
    keys_file: Path | None = None
    # Requests per second (average) and burst per caller, by principal kind; rate 0: no quota.
    quota_carrier_rps: float = 200.0
    quota_carrier_burst: int = 400
    quota_merchant_rps: float = 200.0
    quota_merchant_burst: int = 400
    quota_operator_rps: float = 0.0
    quota_operator_burst: int = 1

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("RELAIS_TLS_CERT and RELAIS_TLS_KEY must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("RELAIS_TLS_CLIENT_CA needs RELAIS_TLS_CERT and RELAIS_TLS_KEY")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SecuritySettings:
        p = "RELAIS_QUOTA_"
        return cls(
            tls_cert=_path(env, "RELAIS_TLS_CERT"),
            tls_key=_path(env, "RELAIS_TLS_KEY"),
            tls_client_ca=_path(env, "RELAIS_TLS_CLIENT_CA"),
            keys_file=_path(env, "RELAIS_KEYS_FILE"),
            quota_carrier_rps=_float(env, p + "CARRIER_RPS", cls.quota_carrier_rps, low=0.0, high=1e6),
            quota_carrier_burst=_int(env, p + "CARRIER_BURST", cls.quota_carrier_burst, low=1, high=10**6),
            quota_merchant_rps=_float(env, p + "MERCHANT_RPS", cls.quota_merchant_rps, low=0.0, high=1e6),
            quota_merchant_burst=_int(env, p + "MERCHANT_BURST", cls.quota_merchant_burst, low=1, high=10**6),
            quota_operator_rps=_float(env, p + "OPERATOR_RPS", cls.quota_operator_rps, low=0.0, high=1e6),
            quota_operator_burst=_int(env, p + "OPERATOR_BURST", cls.quota_operator_burst, low=1, high=10**6),
        )


# --- telemetry: the standard OTEL_* variables ----------------------------------------------------------


def _otlp_headers(env: Mapping[str, str]) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS=api-key=x,tenant=y`` (values URL-encoded, as the spec says)."""
    from urllib.parse import unquote

    headers: dict[str, str] = {}
    for part in (env.get("OTEL_EXPORTER_OTLP_HEADERS") or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise SettingsError("OTEL_EXPORTER_OTLP_HEADERS must be name=value pairs separated by commas")
        headers[name.strip().lower()] = unquote(value.strip())
    return headers


@dataclass(frozen=True)
class TelemetrySettings:
    """OpenTelemetry export: traces and metrics go over OTLP/gRPC only when an endpoint is set."""

    # OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://127.0.0.1:4317; None: tracing and metrics are no-ops.
    otlp_endpoint: str | None = None
    # OTEL_EXPORTER_OTLP_HEADERS, e.g. an API key of the collector.
    otlp_headers: Mapping[str, str] = field(default_factory=dict)
    # OTEL_EXPORTER_OTLP_INSECURE: plaintext to the collector (default for an http:// endpoint).
    otlp_insecure: bool = False
    # OTEL_SERVICE_NAME.
    service_name: str = "relais"
    # OTEL_METRIC_EXPORT_INTERVAL, milliseconds between metric exports.
    metric_interval_ms: int = 60_000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TelemetrySettings:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise SettingsError(
                f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint!r} must start with http:// or https://"
            )
        plain = endpoint is not None and endpoint.startswith("http://")
        return cls(
            otlp_endpoint=endpoint,
            otlp_headers=_otlp_headers(env),
            otlp_insecure=_bool(env, "OTEL_EXPORTER_OTLP_INSECURE", plain),
            service_name=env.get("OTEL_SERVICE_NAME") or cls.service_name,
            metric_interval_ms=_int(
                env, "OTEL_METRIC_EXPORT_INTERVAL", cls.metric_interval_ms, low=100, high=3_600_000
            ),
        )


# No slots: the class attributes double as the defaults from_env falls back to.
@dataclass(frozen=True)
class Settings:
    # gRPC listener, host:port.
    listen: str = "127.0.0.1:50051"
    # None: start a private redis-server on a free loopback port.
    redis_url: str | None = None
    # Number of shard tags; all keys of a parcel share one. Changing it needs a migration.
    shards: int = 16
    # Largest gRPC message accepted or sent.
    max_message_bytes: int = 16 * 1024 * 1024
    # Graceful shutdown: how long in-flight calls may run after SIGTERM.
    grace_s: float = 10.0
    # Keepalive pings from the server, and the least interval it tolerates from clients.
    keepalive_time_s: float = 60.0
    keepalive_min_client_interval_s: float = 10.0
    # Finished parcels (delivered, returned, expired) are removed after this many days.
    retention_days: int = 30
    # Channels the gateway loads, by entry-point name; ``channels_named``: RELAIS_CHANNELS was set (a
    # standalone gateway requires it: the default writes messages to files).
    channels: tuple[str, ...] = ("file",)
    channels_named: bool = False
    # Options per channel, from RELAIS_CHANNEL_<NAME>_<OPTION>.
    channel_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Where the local sinks write what recipients would receive.
    sink_dir: Path = Path("var/sink")
    # Whether `relais run` also starts the gateway and the local sinks.
    run_gateway: bool = True
    log_level: str = "INFO"
    # The gateway: timeouts, retries, SMS rules, rate limits.
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    # Internal alerts: thresholds file, digest interval and email relay.
    alerts: AlertSettings = field(default_factory=AlertSettings)
    # The engine: notice planning rules and the stream window.
    engine: EngineSettings = field(default_factory=EngineSettings)
    # The scheduler: its idle limit and its timers' handlers.
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    # TLS, API keys and quotas of the gRPC listener.
    security: SecuritySettings = field(default_factory=SecuritySettings)
    # OpenTelemetry export (OTEL_* variables).
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 16384:
            raise SettingsError(f"RELAIS_SHARDS={self.shards} is out of range (1 to 16384)")
        if self.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"RELAIS_LOG_LEVEL={self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            listen=_listen(env, "RELAIS_LISTEN", cls.listen),
            redis_url=_redis_url(env),
            shards=_int(env, "RELAIS_SHARDS", cls.shards, low=1, high=16384),
            max_message_bytes=_int(
                env, "RELAIS_MAX_MESSAGE_BYTES", cls.max_message_bytes, low=1024, high=1 << 30
            ),
            grace_s=_float(env, "RELAIS_GRACE_S", cls.grace_s, low=0.0, high=3600.0),
            keepalive_time_s=_float(
                env, "RELAIS_KEEPALIVE_TIME_S", cls.keepalive_time_s, low=1.0, high=7200.0
            ),
            keepalive_min_client_interval_s=_float(
                env,
                "RELAIS_KEEPALIVE_MIN_CLIENT_INTERVAL_S",
                cls.keepalive_min_client_interval_s,
                low=1.0,
                high=7200.0,
            ),
            retention_days=_int(env, "RELAIS_RETENTION_DAYS", cls.retention_days, low=1, high=3650),
            channels=_names(env, "RELAIS_CHANNELS", ",".join(cls.channels)),
            # Set to something: an empty value (a template with nothing filled in) names nothing.
            channels_named=bool(env.get("RELAIS_CHANNELS", "").strip()),
            channel_options=_channel_options(env),
            sink_dir=Path(env.get("RELAIS_SINK_DIR") or cls.sink_dir),
            run_gateway=_bool(env, "RELAIS_RUN_GATEWAY", cls.run_gateway),
            log_level=(env.get("RELAIS_LOG_LEVEL") or cls.log_level).upper(),
            gateway=GatewaySettings.from_env(env),
            alerts=AlertSettings.from_env(env),
            security=SecuritySettings.from_env(env),
            telemetry=TelemetrySettings.from_env(env),
            engine=EngineSettings.from_env(env),
            scheduler=SchedulerSettings.from_env(env),
        )
