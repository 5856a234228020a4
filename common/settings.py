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


def _names(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    raw = env.get(name) or default
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not names:
        raise SettingsError(f"{name} names no channel")
    return names


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
    # Channels the gateway loads, by entry-point name.
    channels: tuple[str, ...] = ("file",)
    # Options per channel, from RELAIS_CHANNEL_<NAME>_<OPTION>.
    channel_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Where the local sinks write what recipients would receive.
    sink_dir: Path = Path("var/sink")
    # Whether `relais run` also starts the gateway and the local sinks.
    run_gateway: bool = True
    log_level: str = "INFO"

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
            channel_options=_channel_options(env),
            sink_dir=Path(env.get("RELAIS_SINK_DIR") or cls.sink_dir),
            run_gateway=_bool(env, "RELAIS_RUN_GATEWAY", cls.run_gateway),
            log_level=(env.get("RELAIS_LOG_LEVEL") or cls.log_level).upper(),
        )
