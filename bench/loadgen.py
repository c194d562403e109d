"""Load generators for Store: h2load sending prebuilt gRPC frames, or a multi-process grpc.aio client.

Both write per-request lines (start in microseconds since the epoch, status, latency in microseconds); the
benchmark reads those, not the generators' summaries, so the two report the same way. h2load only sees HTTP
statuses (a gRPC error is still HTTP 200), which is why the Store section also counts the rows written.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.stats import Latency
from bench.workload import STORE_METHOD
from server.config import PROJECT_ROOT

H2LOAD_CLIENTS = 4  # connections, as a few workers would open; concurrency / 4 streams on each


@dataclass(frozen=True)
class Target:
    """Where to send Store, and what."""

    address: str
    frame_file: Path
    token: str


@dataclass(frozen=True)
class Run:
    """One load run as its generator saw it."""

    sent: int
    ok: int  # answered with HTTP 200 (h2load) or gRPC OK (grpc client)
    seconds: float  # from the first request's start to the last response
    latency: Latency

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class LoadGenerator(Protocol):
    name: str

    def shape(self, concurrency: int) -> str: ...

    async def run(self, target: Target, concurrency: int, *, requests: int = 0, duration: float = 0.0) -> Run:
        """Exactly one of requests (a fixed count) or duration (seconds) is given."""
        ...


def read_log(paths: list[Path]) -> Run:
    starts: list[int] = []
    ends: list[int] = []
    latencies: list[float] = []
    sent = 0
    for path in paths:
        for line in path.read_text().splitlines():
            start, status, micros = line.split("\t")[:3]
            sent += 1
            if status == "200":
                starts.append(int(start))
                ends.append(int(start) + int(micros))
                latencies.append(int(micros) / 1000)
    seconds = (max(ends) - min(starts)) / 1e6 if starts else 0.0
    return Run(sent, len(latencies), seconds, Latency.of(latencies))


class H2Load:
    name = "h2load"

    def __init__(self, binary: str) -> None:
        self._binary = binary
        self.version = subprocess.run(  # noqa: S603 -- our own argv
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()

    @staticmethod
    def split(concurrency: int) -> tuple[int, int]:
        clients = H2LOAD_CLIENTS if concurrency % H2LOAD_CLIENTS == 0 else 1
        return clients, concurrency // clients

    def shape(self, concurrency: int) -> str:
        clients, streams = self.split(concurrency)
        return f"-c {clients} -m {streams}"

    async def run(self, target: Target, concurrency: int, *, requests: int = 0, duration: float = 0.0) -> Run:
        clients, streams = self.split(concurrency)
        amount = ["-n", str(requests)] if requests else ["-D", str(max(1, round(duration)))]
        with tempfile.TemporaryDirectory(prefix="deadletter-bench-h2load-") as folder:
            log = Path(folder) / "requests.log"
            argv = [
                self._binary, *amount, "-c", str(clients), "-m", str(streams), "-t", "1", "-N", "60",
                "-d", str(target.frame_file),
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                "-H", f"authorization: Bearer {target.token}",
                "--log-file", str(log),
                f"http://{target.address}{STORE_METHOD}",
            ]  # fmt: skip
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await process.communicate()
            text = output.decode(errors="replace")
            if process.returncode != 0 or not re.search(r"^requests: \d+ total", text, re.MULTILINE):
                raise RuntimeError(f"h2load failed ({process.returncode}):\n{text[-2000:]}")
            return read_log([log])


class GrpcClients:
    """The fallback: a few processes of bench/grpc_client.py, as many as the CPUs, sharing the concurrency."""

    name = "grpc.aio client processes"

    @staticmethod
    def split(concurrency: int) -> list[int]:
        processes = max(1, min(concurrency, os.cpu_count() or 1))
        return [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]

    def shape(self, concurrency: int) -> str:
        shares = self.split(concurrency)
        return f"{len(shares)} process(es) x {shares[0]} task(s)"

    async def run(self, target: Target, concurrency: int, *, requests: int = 0, duration: float = 0.0) -> Run:
        shares = self.split(concurrency)
        start_at = time.time() + 3  # after every process has imported grpc
        with tempfile.TemporaryDirectory(prefix="deadletter-bench-grpc-") as folder:
            logs = [Path(folder) / f"requests-{i}.log" for i in range(len(shares))]
            processes = []
            for i, (share, log) in enumerate(zip(shares, logs, strict=True)):
                count = requests // len(shares) + (1 if i < requests % len(shares) else 0)
                amount = ["--requests", str(count)] if requests else ["--duration", str(duration)]
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bench.grpc_client",
                        "--address",
                        target.address,
                        "--frame",
                        str(target.frame_file),
                        "--concurrency",
                        str(share),
                        *amount,
                        "--start-at",
                        str(start_at),
                        "--log-file",
                        str(log),
                        cwd=PROJECT_ROOT,
                        env=os.environ | {"BENCH_TOKEN": target.token},
                    )
                )
            codes = [await p.wait() for p in processes]
            if any(codes):
                raise RuntimeError(f"a grpc client process failed: exit codes {codes}")
            return read_log(logs)


def load_generator(choice: str) -> tuple[LoadGenerator, str]:
    """The generator to use and a note on the choice; h2load unless it is missing or grpc is asked for."""
    if choice in ("auto", "h2load"):
        binary = shutil.which("h2load")
        if binary is not None:
            h2load = H2Load(binary)
            return h2load, h2load.version
        if choice == "h2load":
            raise SystemExit("h2load is not installed: apt-get install -y nghttp2-client")
        print(
            "bench: h2load not found (Debian: apt-get install -y nghttp2-client); "
            "falling back to grpc.aio client processes, which saturate sooner",
            file=sys.stderr,
        )
        return GrpcClients(), "fallback: h2load not installed"
    return GrpcClients(), "asked for with --client grpc"
