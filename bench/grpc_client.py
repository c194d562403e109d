"""A closed-loop Store client on grpc.aio: the fallback load generator, and the steady load of the purge section.

As a program (one of several processes the fallback starts): ``python -m bench.grpc_client --address HOST:PORT
--frame FILE --concurrency N (--requests N | --duration S) --start-at EPOCH --log-file PATH`` with the bearer
token in BENCH_TOKEN. It writes one line per request in h2load's --log-file format (start time in microseconds
since the epoch, 200 or -1, latency in microseconds), so both generators are read the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from bench.workload import STORE_METHOD

GRPC_PREFIX_BYTES = 5


@dataclass(frozen=True)
class Sample:
    start: float  # seconds since the epoch
    latency_ms: float
    ok: bool


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])


async def closed_loop(
    address: str,
    token: str,
    message: bytes,
    concurrency: int,
    *,
    requests: int | None = None,
    stop: asyncio.Event | None = None,
    deadline: float | None = None,
) -> list[Sample]:
    """Send the serialized StoreRequest from concurrency tasks until requests are sent, stop is set or the deadline
    (time.monotonic) passes; return every request's sample."""
    samples: list[Sample] = []
    tickets: Iterator[int] = iter(range(requests)) if requests is not None else itertools.count()
    metadata = (("authorization", f"Bearer {token}"),)

    def more() -> bool:
        if stop is not None and stop.is_set():
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return next(tickets, None) is not None

    async with channel(address) as chan:
        # No serializers: the message is already bytes, so the client spends nothing on protobuf.
        store = chan.unary_unary(STORE_METHOD, request_serializer=None, response_deserializer=None)

        async def worker() -> None:
            while more():
                start, began = time.time(), time.perf_counter()
                try:
                    await store(message, metadata=metadata, timeout=60)
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                samples.append(Sample(start, (time.perf_counter() - began) * 1000, ok))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def write_log(samples: list[Sample], path: Path) -> None:
    with path.open("w") as log:
        for s in samples:
            log.write(f"{int(s.start * 1e6)}\t{200 if s.ok else -1}\t{int(s.latency_ms * 1000)}\n")


async def _main(args: argparse.Namespace) -> None:
    message = await asyncio.to_thread(Path(args.frame).read_bytes)
    message = message[GRPC_PREFIX_BYTES:]
    await asyncio.sleep(max(0.0, args.start_at - time.time()))  # every process starts together
    deadline = time.monotonic() + args.duration if args.duration else None
    samples = await closed_loop(
        args.address, os.environ["BENCH_TOKEN"], message, args.concurrency, requests=args.requests, deadline=deadline
    )
    write_log(samples, Path(args.log_file))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--frame", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--log-file", required=True)
    asyncio.run(_main(parser.parse_args()))
