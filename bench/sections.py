"""The measurements, one function per section of the report; each returns figures, never verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench import grpc_client
from bench.database import row_count
from bench.loadgen import LoadGenerator, Run, Target
from bench.processes import Memory, memory, reset_peak
from bench.stats import Latency
from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub
else:
    Stub = Any

PAGE_SIZE = 50
DEEP_PAGE = 1000
RSS_SAMPLE_SECONDS = 5.0
WARM_UP_SHARE = 0.2

Log = Callable[[str], None]


@dataclass(frozen=True)
class StoreRow:
    """One load run against one target at one concurrency."""

    run: Run
    written: int | None  # rows the run added to dead_letter_queue (None for the bare server)
    peak_kib: int | None  # the target process's VmHWM during the run (None for raw INSERTs: no server)

    @property
    def successes(self) -> int:
        return self.run.ok if self.written is None else self.written

    @property
    def errors(self) -> int:
        return self.run.sent - self.successes

    @property
    def rps(self) -> float:
        return self.successes / self.run.seconds if self.run.seconds > 0 else 0.0


async def load_server(
    generator: LoadGenerator, target: Target, pid: int, concurrency: int, requests: int, owner_dsn: str | None
) -> StoreRow:
    """Drive Store for a fixed count; with owner_dsn, count the rows it really wrote."""
    before = await row_count(owner_dsn) if owner_dsn else 0
    reset_peak(pid)
    run = await generator.run(target, concurrency, requests=requests)
    peak = memory(pid)
    written = await row_count(owner_dsn) - before if owner_dsn else None
    return StoreRow(run, written, peak.peak_kib if peak else None)


def service_metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _timed(call: Awaitable[Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    response = await call
    return (time.perf_counter() - began) * 1000, response


@dataclass(frozen=True)
class ListFigures:
    provider: str  # "" for every provider
    first: Latency
    deep_page: int  # the page reached by walking (DEEP_PAGE unless the filter has fewer rows)
    deep: Latency
    walk: Latency  # every page on the way down, once each


@dataclass(frozen=True)
class ReadFigures:
    rows: int
    lists: list[ListFigures]
    get: Latency
    get_errors: int


async def reads(address: str, token: str, sealed_ids: list[uuid.UUID], body: bytes, repeats: int,
                gets: int, rows: int, log: Log) -> ReadFigures:  # fmt: skip
    """List's first and 1,000th page, with and without a provider filter, and Get; one request at a time."""
    metadata = service_metadata(token)
    lists = []
    async with grpc_client.channel(address) as channel:
        stub: Stub = pb_grpc.DeadLetterServiceStub(channel)
        for provider, name in ((pb.PROVIDER_UNSPECIFIED, ""), (pb.PROVIDER_WHATSAPP, "whatsapp")):
            log(f"list: walking to page {DEEP_PAGE} ({name or 'every provider'})")
            reached, token_for_deep, walk = await _walk(stub, metadata, provider)
            first = [await _list(stub, metadata, provider, "") for _ in range(repeats)]
            deep = [await _list(stub, metadata, provider, token_for_deep) for _ in range(repeats)]
            lists.append(ListFigures(name, Latency.of(first), reached, Latency.of(deep), Latency.of(walk)))
        log(f"get: {gets} random ids of {len(sealed_ids)} sealed rows")
        rng = random.Random(7)  # noqa: S311 -- picking ids, not secrets
        latencies, errors = [], 0
        for record_id in (rng.choice(sealed_ids) for _ in range(gets)):
            ms, response = await _timed(stub.Get(pb.GetRequest(id=str(record_id)), metadata=metadata, timeout=30))
            latencies.append(ms)
            errors += response.payload != body
    return ReadFigures(rows, lists, Latency.of(latencies), errors)


async def _list(stub: Stub, metadata: tuple[tuple[str, str]], provider: int, page_token: str) -> float:
    request = pb.ListRequest(provider=provider, page_size=PAGE_SIZE, page_token=page_token)  # type: ignore[arg-type]
    ms, response = await _timed(stub.List(request, metadata=metadata, timeout=30))
    if len(response.dead_letters) != PAGE_SIZE:
        raise RuntimeError(f"List returned {len(response.dead_letters)} rows, not {PAGE_SIZE}")
    return ms


async def _walk(stub: Stub, metadata: tuple[tuple[str, str]], provider: int) -> tuple[int, str, list[float]]:
    """Follow next_page_token down to DEEP_PAGE, or to the last full page if the filter has fewer rows; return that
    page's number, the token that asks for it, and the time of every request on the way."""
    page_token, latencies = "", []
    deepest = (0, "")
    for page in range(1, DEEP_PAGE + 1):
        request = pb.ListRequest(provider=provider, page_size=PAGE_SIZE, page_token=page_token)  # type: ignore[arg-type]
        ms, response = await _timed(stub.List(request, metadata=metadata, timeout=30))
        latencies.append(ms)
        if len(response.dead_letters) == PAGE_SIZE:
            deepest = (page, page_token)
        if not response.next_page_token:
            break
        page_token = response.next_page_token
    if deepest[0] == 0:
        raise RuntimeError("List returned no full page")
    return deepest[0], deepest[1], latencies


@dataclass(frozen=True)
class PurgeFigures:
    purged: int
    seconds: float
    concurrency: int
    without: Latency
    without_rps: float
    during: Latency
    during_rps: float
    without_errors: int
    during_errors: int


async def purge(address: str, token: str, message: bytes, concurrency: int, baseline_seconds: float,
                log: Log) -> PurgeFigures:  # fmt: skip
    """Store p99 under a steady load, then the same load while Purge deletes everything past retention."""
    log(f"purge: steady Store load at concurrency {concurrency} for {baseline_seconds:.0f} s without a purge")
    deadline = time.monotonic() + baseline_seconds
    baseline = await grpc_client.closed_loop(address, token, message, concurrency, deadline=deadline)
    stop = asyncio.Event()
    load = asyncio.create_task(grpc_client.closed_loop(address, token, message, concurrency, stop=stop))
    await asyncio.sleep(2)  # the load is steady before the purge starts
    log("purge: Purge (default cut-off: the retention period) under the same load")
    metadata = service_metadata(token)
    async with grpc_client.channel(address) as channel:
        stub: Stub = pb_grpc.DeadLetterServiceStub(channel)
        started, began = time.time(), time.perf_counter()
        response = await stub.Purge(pb.PurgeRequest(), metadata=metadata, timeout=3600)
        seconds, ended = time.perf_counter() - began, time.time()
    stop.set()
    during = [s for s in await load if s.start >= started and s.start + s.latency_ms / 1000 <= ended]
    return PurgeFigures(
        purged=response.purged_count,
        seconds=seconds,
        concurrency=concurrency,
        without=Latency.of([s.latency_ms for s in baseline if s.ok]),
        without_rps=sum(s.ok for s in baseline) / baseline_seconds,
        during=Latency.of([s.latency_ms for s in during if s.ok]),
        during_rps=sum(s.ok for s in during) / seconds,
        without_errors=sum(not s.ok for s in baseline),
        during_errors=sum(not s.ok for s in during),
    )


@dataclass(frozen=True)
class SoakFigures:
    seconds: float
    concurrency: int
    row: StoreRow
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS KiB)

    @property
    def start_kib(self) -> int:
        return self.samples[0][1]

    @property
    def warm_kib(self) -> int:
        """RSS once the first WARM_UP_SHARE of the run has passed."""
        return next(kib for t, kib in self.samples if t >= WARM_UP_SHARE * self.seconds)

    @property
    def end_kib(self) -> int:
        return self.samples[-1][1]

    @property
    def slope_kib_per_minute(self) -> float:
        """Least-squares slope of RSS after warm-up."""
        points = [(t, kib) for t, kib in self.samples if t >= WARM_UP_SHARE * self.seconds]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_k = sum(k for _, k in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        return 60 * sum((t - mean_t) * (k - mean_k) for t, k in points) / spread if spread else 0.0


async def soak(generator: LoadGenerator, target: Target, pid: int, concurrency: int, seconds: float,
               owner_dsn: str) -> SoakFigures:  # fmt: skip
    """A sustained Store load, sampling the server's RSS every few seconds."""
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sample() -> None:
        began = time.monotonic()
        while True:
            reading: Memory | None = memory(pid)
            elapsed = time.monotonic() - began
            if reading is not None and (not samples or elapsed - samples[-1][0] >= 1):
                samples.append((elapsed, reading.rss_kib))
            if done.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), RSS_SAMPLE_SECONDS)

    before = await row_count(owner_dsn)
    reset_peak(pid)
    sampler = asyncio.create_task(sample())
    try:
        run = await generator.run(target, concurrency, duration=seconds)
    finally:
        done.set()
        await sampler
    peak = memory(pid)
    written = await row_count(owner_dsn) - before
    row = StoreRow(run, written, peak.peak_kib if peak else None)
    return SoakFigures(seconds, concurrency, row, samples)
