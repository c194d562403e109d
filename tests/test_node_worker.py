"""Workers are polyglot: the Node.js example (examples/node-worker, @grpc/grpc-js and @grpc/proto-loader, loading
protos/ as is) stores sample webhooks in the real server, and the Python client reads them back byte for byte.

The server runs as a separate process started the way `make run` starts it (python -m server). Skipped only where
node or npm is not on PATH; the example's dependencies are installed with `npm ci` from its package-lock.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import pytest

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server.auth import Role
from server.config import PROJECT_ROOT
from tests.conftest import JWT_SECRET, SAMPLES, SAMPLES_DIR, Sample, channel_to, token
from tests.processes import ServerProcess, free_port, run

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub
else:
    Stub = Any

EXAMPLE = PROJECT_ROOT / "examples" / "node-worker"
SCRIPT = EXAMPLE / "store-sample.js"
SAMPLE_FILES = ("messenger-bigint-ids.json", "whatsapp-image-with-caption.json")
NPM_CI_TIMEOUT = 180.0
NODE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
async def node_worker() -> str:
    """Path of the node binary, with the example's node_modules installed from its lock file."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js worker example (not on PATH)")
    if not (EXAMPLE / "node_modules").is_dir():
        code, out, err = await run(
            npm, "ci", "--no-audit", "--no-fund", cwd=EXAMPLE, env=os.environ, limit=NPM_CI_TIMEOUT
        )
        assert code == 0, f"npm ci failed ({code}):\n{out[-2000:]}\n{err[-3000:]}"
    return node


def _sample(file: str) -> Sample:
    return next(sample for sample in SAMPLES if sample.file == file)


async def _store(node: str, address: str, bearer: str, sample: Sample) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEADLETTER_")} | {
        "DEADLETTER_ADDRESS": address,
        "DEADLETTER_TOKEN": bearer,
        "SAMPLE_FILE": str(SAMPLES_DIR / sample.file),
        "SAMPLE_PROVIDER": sample.provider,
        "SAMPLE_HEADERS_JSON": json.dumps(sample.headers),
        "CORRELATION_ID": f"node-test-{sample.file}",
    }
    return await run(node, str(SCRIPT), cwd=PROJECT_ROOT, env=env, limit=NODE_TIMEOUT)


async def test_node_worker_stores_samples_byte_for_byte(
    node_worker: str, database_url: str, encryption_key: str
) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "DEADLETTER_ENCRYPTION_KEYS": encryption_key,
        "DEADLETTER_JWT_SECRET": JWT_SECRET,
        "DEADLETTER_LISTEN": f"127.0.0.1:{port}",
    }
    address = f"127.0.0.1:{port}"
    async with ServerProcess(env) as server:
        stored: dict[str, str] = {}
        for file in SAMPLE_FILES:
            code, out, err = await _store(node_worker, address, token(Role.SERVICE, "node-worker"), _sample(file))
            assert code == 0, f"{file}: exit {code}\n{err[-3000:]}\n{server.logs()[-2000:]}"
            response = json.loads(out)
            assert set(response) == {"id", "deduplicated"}, out
            assert response["deduplicated"] is False
            stored[file] = response["id"]

        # A caller the server refuses: non-zero exit, the status code named on stderr, nothing on stdout.
        code, out, err = await _store(node_worker, address, "not-a-token", _sample(SAMPLE_FILES[0]))
        assert code != 0
        assert "UNAUTHENTICATED" in err
        assert out == ""

        async with channel_to(address, token()) as channel:
            stub: Stub = pb_grpc.DeadLetterServiceStub(channel)
            for file, dead_letter_id in stored.items():
                sample = _sample(file)
                got = await stub.Get(pb.GetRequest(id=dead_letter_id))
                assert got.payload == (SAMPLES_DIR / file).read_bytes(), file
                assert dict(got.headers) == sample.headers, file
                letter = got.dead_letter
                assert letter.provider == pb.Provider.Value(f"PROVIDER_{sample.provider.upper()}")
                assert letter.event_id == "sha256:" + hashlib.sha256(sample.body).hexdigest()
                assert letter.correlation_id == f"node-test-{file}"
                assert letter.retry_count == 3
                assert letter.failure_kind == pb.FAILURE_KIND_RETRYABLE
                assert letter.idempotency_key
                assert letter.received_at.seconds > 0
    assert server.returncode == 0
