"""The private system under test: a Redis, the engine and the gateway(s), all on loopback.

Each part is its own process, as in production and so the two cores are shared the way they would
be: ``redis-server`` (``EmbeddedRedis``), the engine (``python -m loadtest.engine_proc``: the gRPC
services and the scheduler; or ``relais serve`` with ``engine="cli"``; ``engine_workers`` processes on
its one port) and one or more counting gateways (``python -m loadtest.sink_gateway``). Everything
listens on 127.0.0.1 on free ports, keeps nothing on disk but the run's folder, and stops with the
``Stack`` (SIGTERM, then SIGKILL after a grace period) — also when the run fails.

The rate limits stay ON but far above the load (a load test measures the engine, not a throttle;
the benchmark measures the limiter's cost separately): each recipient here gets dozens of notices
an hour, which the default cap of a few per recipient would spread over days.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.redis_server import EmbeddedRedis, free_port, tether
from loadtest.meter import process_tree

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0

# Limits on, but never the bottleneck of a load test (see the module's docstring). A recipient's cap
# keeps a real cap's slow rate with a burst no load reaches: its key then lives minutes after each send,
# as under the default 6 an hour, rather than expiring within a second and being created again at the
# recipient's next notice, which is work a real cap never makes Redis do.
GENEROUS_LIMITS: Mapping[str, str] = {
    "RELAIS_GATEWAY_PROVIDER_RATE_PER_S": "10000000",
    "RELAIS_GATEWAY_RECIPIENT_RATE_PER_H": "60",
    "RELAIS_GATEWAY_RECIPIENT_BURST": "1000000",
    "RELAIS_GATEWAY_MERCHANT_RATE_PER_S": "10000000",
    "RELAIS_GATEWAY_MERCHANT_BURST": "10000000",
}


@dataclass(frozen=True, slots=True)
class StackConfig:
    run_dir: Path
    shards: int = 16
    gateways: int = 1
    limits_enabled: bool = True
    # "proc": python -m loadtest.engine_proc (the engine composition and scheduler); "cli": relais serve.
    engine: str = "proc"
    scheduler: bool = True
    # Engine processes sharing its port (``--workers``); an operator runs about one per core, as the
    # benchmark does (``loadtest.bench --engine-workers``).
    engine_workers: int = 1
    # Run the engine under pyinstrument (in one process: a profile follows one interpreter); its text
    # report is written here when the engine stops.
    profile_to: Path | None = None
    # Extra RELAIS_* variables for the engine and the gateways (they win over the defaults here).
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def sink_dir(self) -> Path:
        return self.run_dir / "sink"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"


def _python() -> str:
    return sys.executable


class Stack:
    """Start with ``with Stack(config) as stack:``; ``stack.target`` is the engine's host:port."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis = EmbeddedRedis()
        self.redis_url = ""
        self.target = ""
        self.engine: subprocess.Popen[bytes] | None = None
        self.gateways: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def env(self) -> dict[str, str]:
        """The environment of the engine and gateway processes: this process's minus any REDIS_URL or
        RELAIS_* of the caller, plus the stack's own."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RELAIS_", "REDIS_URL"))}
        base.update(
            {
                "REDIS_URL": self.redis_url,
                "RELAIS_SHARDS": str(self.config.shards),
                "RELAIS_LOG_LEVEL": "WARNING",
                "RELAIS_RUN_GATEWAY": "false",
                "RELAIS_GATEWAY_LIMITS_ENABLED": "true" if self.config.limits_enabled else "false",
                # Corrections wait a debounce after a slot change; a compressed journey cannot wait 2 min.
                "RELAIS_ENGINE_CORRECTION_DEBOUNCE_S": "1",
                **GENEROUS_LIMITS,
                **self.config.env,
            }
        )
        return base

    @property
    def engine_workers(self) -> int:
        return 1 if self.config.profile_to is not None else self.config.engine_workers

    def engine_args(self) -> list[str]:
        workers = ["--workers", str(self.engine_workers)]
        if self.config.engine == "cli":
            return [str(Path(_python()).with_name("relais")), "serve", *workers]
        args = [_python(), "-m", "loadtest.engine_proc", *workers]
        if self.config.profile_to is not None:
            profiler = ["-m", "pyinstrument", "-r", "text", "-o", str(self.config.profile_to)]
            args = [_python(), *profiler, "-m", "loadtest.engine_proc"]
        return args if self.config.scheduler else [*args, "--no-scheduler"]

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = (self.config.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        # Tethered: a harness killed outright (a timeout's SIGKILL) takes its engine and gateways along.
        return subprocess.Popen([*tether(), *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> Stack:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.config.sink_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = self.redis.start()
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        env = self.env()
        self.engine = self._spawn("engine", self.engine_args(), {**env, "RELAIS_LISTEN": self.target})
        for n in range(self.config.gateways):
            args = [_python(), "-m", "loadtest.sink_gateway", "--dir", str(self.config.sink_dir)]
            self.gateways.append(self._spawn(f"gateway-{n}", args, env))
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until the engine's health says SERVING and every worker listens; a part that exits early
        fails the start."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING and self._all_listen():
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(
            f"the engine did not become SERVING in {READY_TIMEOUT_S:.0f}s: see {self.log_hint()}"
        )

    def _all_listen(self) -> bool:
        """Every engine worker has its listener (the first to answer health may be alone so far)."""
        port = int(self.target.rpartition(":")[2])
        listening = 0
        for proc in self.engine_processes():
            with contextlib.suppress(psutil.Error):
                conns = proc.net_connections("tcp")
                listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)
        return listening >= self.engine_workers

    def check_alive(self) -> None:
        for name, proc in self._processes():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}: see {self.log_hint()}")

    def log_hint(self) -> str:
        return str(self.config.log_dir)

    def _processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        named = [("engine", self.engine)] if self.engine is not None else []
        return [*named, *((f"gateway-{n}", p) for n, p in enumerate(self.gateways))]

    def engine_pid(self) -> int | None:
        """The engine's process: with several workers, their supervisor (see ``engine_processes``)."""
        return self.engine.pid if self.engine is not None else None

    def engine_processes(self) -> list[psutil.Process]:
        """The engine's process and its workers, whose CPU and memory the engine's figures add up."""
        return process_tree(self.engine.pid) if self.engine is not None else []

    def engine_rss_bytes(self) -> int | None:
        """The engine's resident memory: its process and its workers' (None once it is gone)."""
        try:
            return sum(int(p.memory_info().rss) for p in self.engine_processes()) or None
        except psutil.Error:
            return None

    def stop_gateways(self) -> None:
        """Stop the gateways first, so their sinks are flushed before anyone reads them."""
        _terminate([p for _, p in self._processes() if p is not self.engine])

    def stop(self) -> None:
        _terminate([p for _, p in self._processes()])
        self.engine = None
        self.gateways = []
        for log in self._logs:
            log.close()
        self._logs = []
        self.redis.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
