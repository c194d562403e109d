"""The service's SQL, loaded once from queries.sql into named, read-only strings."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load(path: Path) -> MappingProxyType[str, str]:
    parts = _NAME.split(path.read_text(encoding="utf-8"))
    # parts = [preamble, name1, body1, name2, body2, ...]
    return MappingProxyType({name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)})


QUERIES = _load(Path(__file__).with_name("queries.sql"))
