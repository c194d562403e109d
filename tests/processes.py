"""The server as a separate OS process, started the way `make run` starts it: python -m server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from server.config import PROJECT_ROOT

BANNER_END = "Stop with Ctrl-C."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(overrides: dict[str, str]) -> dict[str, str]:
    """The test runner's environment without any deadletter setting, plus overrides.

    Plaintext is allowed explicitly: these servers listen on loopback with DATABASE_URL set, which the server
    otherwise refuses without TLS (tests/test_transport.py covers TLS).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEADLETTER_") and k != "DATABASE_URL"}
    # A free metrics port each (port 0): several servers may run at once.
    defaults = {"DEADLETTER_ALLOW_PLAINTEXT": "true", "DEADLETTER_METRICS_LISTEN": "127.0.0.1:0"}
    return env | defaults | overrides


class ServerProcess:
    """Starts python -m server, waits for its banner, and on exit stops it with SIGTERM."""

    def __init__(self, env: dict[str, str], *, start_timeout: float = 60.0) -> None:
        self._env = server_env(env)
        self._start_timeout = start_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="deadletter-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: asyncio.subprocess.Process | None = None
        self.banner = ""
        self.returncode: int | None = None

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def __aenter__(self) -> ServerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            cwd=PROJECT_ROOT,
            env=self._env,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )
        try:
            await asyncio.wait_for(self._read_banner(), self._start_timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _read_banner(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while BANNER_END not in self.banner:
            line = await self.process.stdout.readline()
            if not line:
                code = await self.process.wait()
                raise RuntimeError(f"server exited with {code} before serving:\n{self.logs()[-4000:]}")
            self.banner += line.decode()

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL after 30 s)."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._log.close()
        self.returncode = self.process.returncode
        assert self.returncode is not None
        return self.returncode

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def run(*command: str, cwd: os.PathLike[str] | str, env: Mapping[str, str], limit: float) -> tuple[int, str, str]:
    """Run a command to completion within limit seconds; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def run_server_command(
    env: dict[str, str], limit_seconds: float = 60.0, command: str = "serve"
) -> tuple[int, str]:
    """Run python -m server COMMAND to completion (serve: where it must refuse to start); return code and output."""
    code, out, err = await run(
        sys.executable, "-m", "server", command, cwd=PROJECT_ROOT, env=server_env(env), limit=limit_seconds
    )
    return code, out + err
