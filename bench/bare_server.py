"""Ceiling (a): a bare grpc.aio server whose Store answers at once, with no token check, database or logging.

Run as its own process, like the real server: ``python -m bench.bare_server PORT``. It prints one line once it
is listening and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import grpc.aio

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc

READY = "bare server listening"


class BareServicer(pb_grpc.DeadLetterServiceServicer):
    """Same service and method path as the real server; Store returns a fresh id and nothing else."""

    async def Store(self, request: pb.StoreRequest, context: object) -> pb.StoreResponse:
        return pb.StoreResponse(id=str(uuid.uuid4()))


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # The other methods keep the generated UNIMPLEMENTED bodies (abstract only in the type stubs).
    pb_grpc.add_DeadLetterServiceServicer_to_server(BareServicer(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(READY, flush=True)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
