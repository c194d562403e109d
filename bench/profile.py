"""Optional: py-spy on the server during one more Store run at the highest concurrency (--profile DIR).

The run is extra and not reported, so sampling cannot distort the figures. Python frames only (--native would
pause the server at every sample and slow it tenfold): time in grpc's Cython and in asyncio's C tasks shows as
self time of asyncio's Handle._run. Writes py-spy's collapsed stacks (DIR/store.folded,
loadable in speedscope or flamegraph.pl) and a short list of the functions the server spends its own time in
(DIR/store-top.txt), which is also printed to stderr.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

TOP = 25
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def recording(pid: int, folder: Path) -> AsyncIterator[None]:
    binary = py_spy()
    if binary is None:
        print("bench: --profile needs py-spy (.venv/bin/pip install py-spy); not profiling", file=sys.stderr)
        yield
        return
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    output = folder / "store.folded"
    process = await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw",
        "--output", str(output), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        await process.wait()
    if output.exists():
        top = top_functions(output)
        (folder / "store-top.txt").write_text(top)
        print(top, file=sys.stderr)


def top_functions(folded: Path) -> str:
    """The leaf frames with the most samples (self time), and the server's own functions by total time."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]  # by function, not by line
        samples += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    lines = [f"py-spy: {samples} samples of the server during the Store load", "", "self time:"]
    lines += [f"{100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(TOP)]
    lines += ["", "server/ functions, total time (on the stack):"]
    ours = [(frame, n) for frame, n in total.most_common() if "(server/" in frame][:TOP]
    lines += [f"{100 * n / samples:5.1f}%  {frame}" for frame, n in ours]
    return "\n".join(lines) + "\n"
