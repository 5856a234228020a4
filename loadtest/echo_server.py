"""A bare ``grpc.aio`` TrackingService that acknowledges every batch and does nothing else.

It parses and answers the same message shapes as the engine (EventBatch in, BatchAck out, over the
same bidirectional stream and server options), so its rate is the ceiling the framework allows on
this machine: the engine's ingest rate is read against it.

``python -m loadtest.echo_server --port 50099`` serves it until interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
from relais.v1 import tracking_pb2, tracking_pb2_grpc

from common.settings import Settings
from engine.server import server_options


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


async def start_echo(listen: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Start the echo server with the engine's own server options; returns it and its port."""
    server = grpc.aio.server(options=server_options(Settings(listen=listen)))
    tracking_pb2_grpc.add_TrackingServiceServicer_to_server(EchoTracking(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port


async def _serve(listen: str) -> None:
    server, port = await start_echo(listen)
    print(f"echo TrackingService on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: any free one)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_serve(f"127.0.0.1:{args.port}"))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
