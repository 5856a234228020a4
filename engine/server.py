"""The engine's gRPC server: the relais.v1 services, health and reflection, graceful shutdown.

Shutdown has two stages (as grpclib does it): the first signal turns health NOT_SERVING so load
balancers stop sending, lets in-flight calls finish within the grace period, then stops; a second
signal stops at once.

Several server processes may share one port (``reuse_port``: SO_REUSEPORT, the kernel spreads the
connections over them; see ``cli.workers``). A single one keeps the port to itself, so a second engine
started by mistake on the same address fails loudly instead of taking half the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# grpc-stubs predate the asyncio health servicer, hence the ignore and the Any below.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.clock import Clock, SystemClock
from common.errors import ListenError
from common.settings import Settings
from common.telemetry import Telemetry, noop_telemetry
from engine.auth import check_open_listener, server_credentials
from engine.interceptors import GuardedRegistry, build_guards
from engine.services import SERVICE_NAMES

if TYPE_CHECKING:
    from engine.stream_balance import WorkerPeers

log = logging.getLogger(__name__)

# A repeat this soon after the first SIGTERM is the same request to stop, delivered twice: systemd's
# default stop (KillMode=control-group), `kill -TERM -<pgid>` and `timeout` signal every process of
# the group, so a worker gets it from the sender and again from its supervisor. Only a later one
# means "stop now": taken as such, it cut every drain short.
SAME_STOP_S = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.keepalive_min_client_interval_s * 1000),
        ),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


@dataclass
class EngineServer:
    """A started server; ``port`` is the bound port (useful when listening on port 0)."""

    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    port: int
    grace_s: float
    draining: bool = False
    redis_watch: asyncio.Task[None] | None = None
    # This worker's private socket for streams its peers relay (``engine.stream_balance``).
    peers: WorkerPeers | None = None
    # Set once ``stop`` drained the peers' socket too: ``wait`` returns only then.
    peers_drained: asyncio.Event = field(default_factory=asyncio.Event)

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING first, then let in-flight calls finish within the grace period."""
        self.draining = True
        if self.redis_watch is not None:
            self.redis_watch.cancel()
        await self.set_serving(False)
        grace = self.grace_s if grace_s is None else grace_s
        if self.peers is None:
            await self.server.stop(grace)
            return
        # Peers stop relaying new streams here at once; the relayed ones drain beside this server's,
        # whose relayed streams keep their channels to the peers until it stopped.
        self.peers.withdraw()
        await asyncio.gather(self.server.stop(grace), self.peers.stop(grace))
        await self.peers.close()
        self.peers_drained.set()

    async def wait(self) -> None:
        """Until the server stopped and, when draining, the streams peers relayed here finished too:
        the public server of a worker that only applies relayed streams stops at once, and returning
        then would end the process under them."""
        await self.server.wait_for_termination()
        if self.peers is not None and self.draining:
            await self.peers_drained.wait()


async def start_server(
    settings: Settings,
    redis: Redis,
    *,
    register: Sequence[Callable[[grpc.aio.Server], None]] = (),
    clock: Clock | None = None,
    telemetry: Telemetry | None = None,
    reuse_port: bool = False,
) -> EngineServer:
    """Start listening. ``register`` are callables ``(server) -> None`` that add the relais services.

    Every call first goes through the guards of ``engine.interceptors`` (spans, errors, then keys
    and quotas when ``RELAIS_KEYS_FILE`` is set); without keys only a loopback address is accepted.
    TLS (and mutual TLS) when ``RELAIS_TLS_CERT``/``RELAIS_TLS_KEY`` (``RELAIS_TLS_CLIENT_CA``) are set.

    Health stays NOT_SERVING until Redis answers a PING.
    """
    security = settings.security
    check_open_listener(settings.listen, security.keys_file)
    guards = build_guards(settings, redis, clock or SystemClock(), telemetry or noop_telemetry())
    server = grpc.aio.server(options=server_options(settings, reuse_port=reuse_port))
    # The services register on a stand-in that wraps their handlers in the guards on the way.
    registry = GuardedRegistry(server, guards)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    for add in register:
        add(registry)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        registry,
    )
    credentials = server_credentials(security.tls_cert, security.tls_key, security.tls_client_ca)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError:
        # grpcio raises (older releases returned 0) when the address is taken or not this host's.
        port = 0
    if port == 0:
        raise ListenError(
            f"cannot listen on {settings.listen} (RELAIS_LISTEN): the port is taken, or not local"
        )
    running = EngineServer(server=server, health=health_servicer, port=port, grace_s=settings.grace_s)
    await running.set_serving(False)
    await server.start()
    running.redis_watch = asyncio.create_task(_serve_once_redis_answers(running, redis))
    return running


async def _serve_once_redis_answers(running: EngineServer, redis: Redis) -> None:
    """Health turns SERVING only when Redis answers: until then load balancers keep traffic away."""
    delay_s = 0.05
    while True:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            log.warning("Redis does not answer yet (%s); health stays NOT_SERVING", type(exc).__name__)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
            continue
        if not running.draining:
            await running.set_serving(True)
        return


def install_signal_handlers(
    running: EngineServer,
    stopped: asyncio.Event,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """First SIGTERM/SIGINT drains within the grace period; a second one, ``SAME_STOP_S`` or more
    later, stops at once. A worker of ``cli.workers`` handles SIGTERM only: its supervisor turns the
    terminal's SIGINT into SIGTERM."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    first_at: list[float] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopped.is_set():
            if loop.time() - first_at[0] < SAME_STOP_S:
                log.info("%s again: the same request to stop, still draining", name)
                return
            log.warning("second %s: stopping now", name)
            tasks.add(loop.create_task(running.stop(0)))
            return
        log.info("%s: draining for up to %.1fs", name, running.grace_s)
        first_at.append(loop.time())
        stopped.set()
        tasks.add(loop.create_task(running.stop()))

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
