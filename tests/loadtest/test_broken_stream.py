"""A carrier whose StreamEvents call breaks: Locust's run ends promptly and says so, instead of the
sender waiting for window room until the time cap while the log claims every event was sent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from relais.v1 import tracking_pb2, tracking_pb2_grpc

from loadtest.echo_server import EchoTracking
from loadtest.run import QUICK, locust_command

CAP_S = 60


class BreaksAfterTwo(EchoTracking):
    """Acknowledges two batches per stream, then fails the call as an engine going away would."""

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[tracking_pb2.EventBatch],
        context: grpc.aio.ServicerContext[tracking_pb2.EventBatch, tracking_pb2.BatchAck],
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        n = 0
        async for batch in request_iterator:
            n += 1
            if n > 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            yield tracking_pb2.BatchAck(seq=batch.seq, accepted=len(batch.events))


@pytest.mark.timeout(CAP_S + 30)
async def test_a_broken_stream_ends_the_run_and_is_counted(tmp_path: Path) -> None:
    server = grpc.aio.server()
    tracking_pb2_grpc.add_TrackingServiceServicer_to_server(BreaksAfterTwo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    profile = dataclasses.replace(QUICK, events=20_000, duration_s=CAP_S)
    started = time.monotonic()
    try:
        with (tmp_path / "locust.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *locust_command(profile, f"127.0.0.1:{port}", tmp_path), stdout=log, stderr=log
            )
            await asyncio.wait_for(proc.wait(), timeout=CAP_S + 20)
    finally:
        await server.stop(0)
    elapsed = time.monotonic() - started
    tally = json.loads((tmp_path / "tally.json").read_text())
    text = (tmp_path / "locust.log").read_text()
    assert elapsed < CAP_S / 2, text  # ended by the failure, not by the time cap
    assert tally["streams_broken"] == QUICK.carriers
    assert tally["events_accepted"] < profile.events
    assert "on a broken stream" in text
    assert "every carrier has sent its events" not in text
