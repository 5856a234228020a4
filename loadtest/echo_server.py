"""Bare ``grpc.aio`` services that answer without doing anything: the framework's share of a figure.

- ``EchoTracking`` acknowledges every batch. It parses and answers the same message shapes as the
  engine (EventBatch in, BatchAck out, over the same bidirectional stream and server options), so its
  rate is the ceiling the framework allows on this machine: the engine's ingest rate is read against it.
- ``EchoParcels`` answers every GetParcel with the next of a set of views the engine gave (same
  messages, same sizes) and reads nothing: its latency and CPU per call at the benchmark's rate are the
  floor a unary call sits on here, and the engine's GetParcel figures are read against them. The floor
  moves with the machine's speed from one day to the next; the distance above it is the engine's own.

``python -m loadtest.echo_server --port 50099 [--views FILE --workers N]`` serves until interrupted;
``--workers`` runs N processes on the port, as the engine's workers share theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import signal
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from relais.v1 import parcel_pb2, parcel_pb2_grpc, tracking_pb2, tracking_pb2_grpc

from cli.workers import run_workers
from common.settings import Settings
from engine.server import server_options

_LENGTH = struct.Struct(">I")


class EchoTracking(tracking_pb2_grpc.TrackingServiceServicer):
    """Counts the events of each batch into its ack, as if every one were accepted."""

    async def StreamEvents(  # noqa: N802 (the gRPC method's name)
        self,
        request_iterator: AsyncIterator[tracking_pb2.EventBatch],
        context: grpc.aio.ServicerContext[tracking_pb2.EventBatch, tracking_pb2.BatchAck],
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        async for batch in request_iterator:
            yield tracking_pb2.BatchAck(seq=batch.seq, accepted=len(batch.events))

    async def RecordEvents(  # noqa: N802
        self,
        request: tracking_pb2.EventBatch,
        context: grpc.aio.ServicerContext[tracking_pb2.EventBatch, tracking_pb2.BatchAck],
    ) -> tracking_pb2.BatchAck:
        return tracking_pb2.BatchAck(seq=request.seq, accepted=len(request.events))


class EchoParcels(parcel_pb2_grpc.ParcelServiceServicer):
    """Answers each GetParcel with the next view of ``views``, whatever parcel it names."""

    def __init__(self, views: Sequence[parcel_pb2.ParcelView]) -> None:
        if not views:
            raise ValueError("EchoParcels needs at least one view to answer with")
        self._views = itertools.cycle(views)

    async def GetParcel(  # noqa: N802
        self,
        request: parcel_pb2.GetParcelRequest,
        context: grpc.aio.ServicerContext[parcel_pb2.GetParcelRequest, parcel_pb2.ParcelView],
    ) -> parcel_pb2.ParcelView:
        return next(self._views)

    async def RegisterParcels(  # noqa: N802
        self,
        request: parcel_pb2.RegisterParcelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> parcel_pb2.RegisterParcelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server answers GetParcel only")
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def write_views(path: Path, views: Sequence[parcel_pb2.ParcelView]) -> None:
    """Views for ``--views``: each serialized, after its length (4 bytes, big-endian)."""
    path.write_bytes(b"".join(_LENGTH.pack(len(raw)) + raw for raw in (v.SerializeToString() for v in views)))


def read_views(path: Path) -> list[parcel_pb2.ParcelView]:
    """The views ``write_views`` wrote."""
    data, views, at = path.read_bytes(), [], 0
    while at < len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        views.append(parcel_pb2.ParcelView.FromString(data[at : at + size]))
        at += size
    return views


async def start_echo(
    listen: str = "127.0.0.1:0",
    *,
    views: Sequence[parcel_pb2.ParcelView] = (),
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Start the echo services with the engine's own server options; returns the server and its port.
    GetParcel is served only when ``views`` are given."""
    server = grpc.aio.server(options=server_options(Settings(listen=listen), reuse_port=reuse_port))
    tracking_pb2_grpc.add_TrackingServiceServicer_to_server(EchoTracking(), server)
    if views:
        parcel_pb2_grpc.add_ParcelServiceServicer_to_server(EchoParcels(views), server)
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port


async def _serve(listen: str, views_path: Path | None, reuse_port: bool) -> None:
    views = read_views(views_path) if views_path is not None else []
    server, port = await start_echo(listen, views=views, reuse_port=reuse_port)
    # SIGTERM ends it cleanly (exit code 0): the benchmark stops it so, and a worker supervisor
    # (``cli.workers``) passes its stop on so and counts any other end as a failure.
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"echo services on 127.0.0.1:{port} ({len(views)} views)", flush=True)
    await stopped.wait()
    await server.stop(0)


def _run(listen: str, views_path: Path | None, reuse_port: bool, _index: int = 0) -> None:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(listen, views_path, reuse_port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: any free one)")
    parser.add_argument("--views", type=Path, help="views GetParcel answers with (see write_views)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (needs --port)")
    args = parser.parse_args()
    listen = f"127.0.0.1:{args.port}"
    if args.workers == 1:
        _run(listen, args.views, False)
        return
    if args.port == 0:
        parser.error("--workers needs a --port: the processes must all bind the same one")
    serve = functools.partial(_run, listen, args.views, True)
    raise SystemExit(run_workers(serve, args.workers, name="echo"))


if __name__ == "__main__":
    main()
