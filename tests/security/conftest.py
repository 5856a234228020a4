"""Fixtures of the security tests: a PKI made at test time, API keys in a keys file, and a started
engine server on a loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from common.clock import Clock
from common.settings import SecuritySettings, Settings
from common.telemetry import Telemetry
from engine.auth import Principal, hash_key
from engine.server import EngineServer, start_server
from tests.security.pki import Pki, make_pki

KEYS = {
    "carrier:swisspost": "key-swisspost",
    "carrier:dhl-de": "key-dhl",
    "merchant:acme": "key-acme",
    "merchant:globex": "key-globex",
    "operator": "key-operator",
}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.jsonl"
    lines = [
        f'{{"sha256": "{hash_key(key)}", "principal": "{Principal.parse(who)}"}}' for who, key in KEYS.items()
    ]
    path.write_text("# test keys\n" + "\n".join(lines) + "\n")
    return path


def bearer(principal: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[principal]}"),)


def settings_with(security: SecuritySettings, **overrides: object) -> Settings:
    return replace(Settings(listen="127.0.0.1:0", grace_s=0.5, security=security), **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    redis: Redis,
    clock: Clock,
    register: Sequence[Callable[[grpc.aio.Server], None]],
    telemetry: Telemetry | None = None,
) -> AsyncIterator[EngineServer]:
    running = await start_server(settings, redis, register=register, clock=clock, telemetry=telemetry)
    try:
        yield running
    finally:
        await running.stop(0)
