"""generated/ is exactly what scripts/gen_protos.py makes from protos/ (run `make generate` after a change)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from server.config import PROJECT_ROOT

GENERATED = PROJECT_ROOT / "generated"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    fresh, committed = _files(tmp_path), _files(GENERATED)
    assert fresh == committed, "generated/ has missing or extra files: run `make generate`"
    stale = [name for name in sorted(fresh) if not filecmp.cmp(tmp_path / name, GENERATED / name, shallow=False)]
    assert not stale, f"generated/ is stale ({', '.join(stale)}): run `make generate`"
