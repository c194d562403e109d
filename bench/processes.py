"""The processes the benchmark starts: the real server (python -m server), the bare server, and RSS readings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server.config import PROJECT_ROOT

SERVER_READY = "Stop with Ctrl-C."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Memory:
    """A process's resident set size and its peak (VmHWM) since start or since reset_peak, in KiB."""

    rss_kib: int
    peak_kib: int


def memory(pid: int) -> Memory | None:
    """Read /proc/PID/status; None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = {name: value.split()[0] for name, _, value in (line.partition(":") for line in lines) if value.strip()}
    return Memory(int(fields["VmRSS"]), int(fields["VmHWM"]))


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+), so each phase reports its own peak; False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Process:
    """A started child process and where its stderr goes."""

    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]


@contextlib.asynccontextmanager
async def running(
    argv: list[str], env: dict[str, str], ready: str, log_path: Path, start_seconds: float = 120.0
) -> AsyncIterator[Process]:
    """Start argv with Python, wait for the ready line on stdout, and stop it with SIGTERM at the end."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    child = Process(process, log_path)
    drain: asyncio.Task[None] | None = None
    try:
        try:
            await asyncio.wait_for(_wait_for_line(process, ready), start_seconds)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{argv[:2]} did not start: {error!r}\n--- {log_path} ---\n{child.log_tail()}") from None
        drain = asyncio.create_task(_drain(process))
        yield child
    finally:
        await _stop(process)
        if drain is not None:
            drain.cancel()


def server_env(settings: dict[str, str]) -> dict[str, str]:
    """This environment without any deadletter setting, plus the given ones."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEADLETTER_") and k != "DATABASE_URL"}
    return inherited | {"GRPC_VERBOSITY": "ERROR"} | settings


async def _wait_for_line(process: asyncio.subprocess.Process, ready: str) -> None:
    assert process.stdout is not None
    while True:
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited with {await process.wait()} before it was ready")
        if ready in line.decode(errors="replace"):
            return


async def _drain(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while await process.stdout.read(65536):
        pass


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
