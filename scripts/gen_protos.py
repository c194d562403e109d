"""Regenerate generated/ from protos/: Python messages, gRPC stubs and their .pyi type stubs.

Usage: python scripts/gen_protos.py [OUTPUT_DIR]   (default: generated/)

The proto tree mirrors the Python package (protos/deadletter/v1 -> deadletter.v1), so protoc's imports resolve
without sys.path tricks. tests/test_generated.py regenerates into a temporary folder and fails on any drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> None:
    """Compile every .proto under protos/ into out/, adding the package __init__ files protoc omits."""
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins sit beside this interpreter; name them so no activated venv is needed.
    plugins = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for source in sources:
        package = out / Path(source).parent
        while package != out:
            (package / "__init__.py").touch()
            package = package.parent


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "generated")
