"""`relais run` as a newcomer starts it: no Redis beforehand, health and reflection answer, SIGTERM stops."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from relais.v1 import (
    parcel_pb2,
    parcel_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
    types_pb2,
)

from common.redis_server import free_port
from tests.engine.core_support import HOUR_MS, event, registration
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
        await journey(port)
        # The SLOT_ANNOUNCED email reaches the SMTP sink, in French; SHIPPED too.
        mails = await wait_for_files(tmp_path / "sink" / "smtp", count=2, timeout_s=30)
        texts = [m.read_text(errors="replace") for m in mails]
        assert any("lea@example.org" in t and "Content-Language: fr" in t for t in texts)
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


def test_a_taken_port_stops_relais_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, RELAIS_LISTEN=f"127.0.0.1:{port}", REDIS_URL="redis://127.0.0.1:1/0")
        done = subprocess.run([str(RELAIS), "serve"], env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}".encode() in done.stderr
    assert b"Traceback" not in done.stderr


async def journey(port: int) -> None:
    """A merchant registers a parcel and its recipient; the carrier announces a slot tomorrow."""
    now_ms = int(time.time() * 1000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        prefs = preferences_pb2.RecipientPreferences(
            recipient_id="acme/r1", locale="fr", time_zone="Europe/Paris", email="lea@example.org"
        )
        await preferences_pb2_grpc.PreferenceServiceStub(channel).UpdatePreferences(
            preferences_pb2.UpdatePreferencesRequest(preferences=prefs), timeout=5
        )
        registered = await parcel_pb2_grpc.ParcelServiceStub(channel).RegisterParcels(
            parcel_pb2.RegisterParcelsRequest(parcels=[registration("RUN-1")]), timeout=5
        )
        assert registered.registered == 1
        slot = (now_ms + 24 * HOUR_MS, now_ms + 26 * HOUR_MS)
        batch = tracking_pb2.EventBatch(
            seq=1,
            events=[
                event("e1", "RUN-1", types_pb2.TRACKING_STATUS_IN_TRANSIT, now_ms - HOUR_MS),
                event("e2", "RUN-1", types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY, now_ms, slot=slot),
            ],
        )
        ack = await tracking_pb2_grpc.TrackingServiceStub(channel).RecordEvents(batch, timeout=5)
        assert (ack.accepted, list(ack.rejected)) == (2, [])


async def wait_for_files(folder: Path, *, count: int, timeout_s: float) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(lambda: sorted(folder.glob("*.eml")) if folder.exists() else [])
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} messages in {folder} after {timeout_s}s")
