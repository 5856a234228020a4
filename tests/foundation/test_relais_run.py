"""`relais run` as a newcomer starts it: no Redis beforehand, health and reflection answer, SIGTERM stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.redis_server import free_port
from tests.foundation.test_server import list_services

RELAIS = Path(sys.executable).parent / "relais"


async def wait_serving(port: int, timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return int(reply.status)
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
            await asyncio.sleep(0.1)


async def test_relais_run_serves_with_embedded_redis(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RELAIS_")}
    env |= {"RELAIS_LISTEN": f"127.0.0.1:{port}", "RELAIS_SINK_DIR": str(tmp_path / "sink")}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we signal and reap below, not awaited IO
        [str(RELAIS), "run"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert await wait_serving(port, timeout_s=30) == health_pb2.HealthCheckResponse.SERVING
        assert {"relais.v1.TrackingService", "relais.v1.AlertService"} <= await list_services(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert b"listening on" in stderr


def test_bad_setting_stops_relais_with_a_clear_message() -> None:
    env = dict(os.environ, RELAIS_SHARDS="lots")
    done = subprocess.run([str(RELAIS), "serve"], env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert b"RELAIS_SHARDS" in done.stderr
