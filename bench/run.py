"""The issue-6 benchmark: one command that measures deadletter on this machine and prints markdown tables.

    .venv/bin/python bench/run.py            # the full run (10^6 rows, 5-minute soak): about 10 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # 10^5 rows, 30-second soak: about 2 minutes

PostgreSQL is DATABASE_URL when set (a role that may create databases), else a private pgserver in a temporary
directory. The tables go to stdout; progress goes to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable, like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no fork() notices

from bench import report, sections
from bench.bare_server import READY as BARE_READY
from bench.database import Database, bench_database, postgres, row_count
from bench.loadgen import Target, load_generator
from bench.processes import SERVER_READY, Process, free_port, running, server_env
from bench.profile import recording
from bench.raw_insert import raw_inserts
from bench.seed import seed
from bench.workload import Workload, workload
from server.auth import Role, generate_jwt_secret, mint_token
from server.crypto import Keyring, generate_key

LEVELS = (1, 16, 64)
TOKEN_TTL_SECONDS = 6 * 3600
RETENTION_DAYS = 90
SEALED_ROWS = 2000


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for iteration (about 2 minutes)")
    parser.add_argument("--rows", type=int, help="rows for List, Get and Purge (default 10^6; --quick 10^5)")
    parser.add_argument(
        "--requests", type=int, help="Store requests per run at concurrency 16 and 64, a tenth at 1 (default 20000)"
    )
    parser.add_argument("--soak-seconds", type=float, help="the memory section's Store load (default 300; --quick 30)")
    parser.add_argument("--client", choices=("auto", "h2load", "grpc"), default="auto", help="Store load generator")
    parser.add_argument("--pool-size", type=int, default=20, help="DEADLETTER_DB_POOL_MAX_SIZE (default 20)")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="another setting for the server"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the server during one extra, unreported Store run at 64"
    )
    parser.add_argument(
        "--store-only", action="store_true", help="only the Store section and its ceilings (for iterating)"
    )
    parser.add_argument("--output", type=Path, help="also write the markdown to this file")
    options = parser.parse_args(argv)
    quick = options.quick
    options.rows = options.rows or (100_000 if quick else 1_000_000)
    options.requests = options.requests or (4000 if quick else 20_000)
    options.soak_seconds = options.soak_seconds or (30.0 if quick else 300.0)
    options.warm_up = 500 if quick else 2000
    options.list_repeats = 100 if quick else 200
    options.gets = 300 if quick else 1000
    options.purge_concurrency = 8
    options.purge_baseline_seconds = 10.0 if quick else 20.0
    options.soak_concurrency = 16
    return options


class Bench:
    def __init__(self, options: argparse.Namespace, folder: Path) -> None:
        self.options = options
        self.folder = folder
        self.started = time.monotonic()
        self.generator, self.generator_note = load_generator(options.client)
        self.work: Workload = workload()
        self.keys = generate_key()
        self.keyring = Keyring.parse(self.keys)
        self.jwt_secret = generate_jwt_secret()
        self.token = mint_token(self.jwt_secret, Role.SERVICE, "bench", TOKEN_TTL_SECONDS)
        self.frame_file = folder / "store-request.grpc"
        self.frame_file.write_bytes(self.work.frame)
        self._port = 0  # the real server's, once started

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def count(self, concurrency: int) -> int:
        requests = int(self.options.requests)
        return requests if concurrency > 1 else max(200, requests // 10)

    def target(self, port: int) -> Target:
        return Target(f"127.0.0.1:{port}", self.frame_file, self.token)

    async def run(self) -> str:
        load_before = os.getloadavg()[0]
        if load_before > 0.5:
            self.log(f"warning: the machine is busy (1-minute load average {load_before:.2f}); figures will be noisy")
        async with postgres() as pg, bench_database(pg) as db:
            self.log(f"PostgreSQL {db.version}, {pg.mode}; database {db.name}")
            date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            bare = await self.bare_ceiling()
            raw, connections = await self.raw_ceiling(db)
            async with self.server(db) as server:
                real = await self.store(server, db)
                store = report.StoreFigures(
                    LEVELS, {c: self.generator.shape(c) for c in LEVELS}, real, bare, raw, connections
                )
                if self.options.store_only:
                    return report.store_section(store) + "\n"
                reads, purge, soak = await self.rows_sections(server, db)
            elapsed = time.monotonic() - self.started
            head = report.Header(
                date=date,
                machine=f"{_machine()}; 1-minute load average {load_before:.2f} before the run, "
                f"{os.getloadavg()[0]:.2f} at the end",
                postgres=f"{db.version}, {pg.mode}; {db.settings}",
                generator=f"{self.generator.name} ({self.generator_note})",
                server=self._server_description(),
                command=shlex.join(["bench/run.py", *sys.argv[1:]]) + f" (took {elapsed / 60:.1f} min)",
            )
        parts = [
            report.header(head),
            report.store_section(store),
            report.reads_section(reads),
            report.purge_section(purge, self.options.rows),
            report.soak_section(soak),
            report.summary(store, reads, purge, soak),
        ]
        return "\n\n".join(parts) + "\n"

    async def bare_ceiling(self) -> dict[int, sections.StoreRow]:
        port = free_port()
        argv = ["-m", "bench.bare_server", str(port)]
        async with running(argv, server_env({}), BARE_READY, self.folder / "bare.log") as bare:
            return await self._levels("(a) bare grpc.aio", bare, self.target(port), None)

    async def raw_ceiling(self, db: Database) -> tuple[dict[int, sections.StoreRow], dict[int, int]]:
        rows, connections = {}, {}
        for c in LEVELS:
            self.log(f"store: (b) raw asyncpg INSERT, concurrency {c}, {self.count(c)} rows")
            before = await row_count(db.owner_dsn)
            run = await raw_inserts(db.owner_dsn, self.keyring, self.work, c, self.count(c), self.options.pool_size)
            written = await row_count(db.owner_dsn) - before
            rows[c] = sections.StoreRow(run, written, None)
            self.log(f"  {rows[c].rps:.0f} req/s, p50 {run.latency.p50:.1f} ms, p99 {run.latency.p99:.1f} ms")
            connections[c] = min(c, self.options.pool_size)
        return rows, connections

    async def store(self, server: Process, db: Database) -> dict[int, sections.StoreRow]:
        return await self._levels("deadletter Store", server, self.target(self._port), db.owner_dsn)

    async def _levels(
        self, name: str, process: Process, target: Target, owner_dsn: str | None
    ) -> dict[int, sections.StoreRow]:
        self.log(f"store: {name}, warm-up ({self.options.warm_up} requests at concurrency {max(LEVELS)})")
        await self.generator.run(target, max(LEVELS), requests=self.options.warm_up)
        rows = {}
        for c in LEVELS:
            self.log(f"store: {name}, concurrency {c} ({self.generator.shape(c)}), {self.count(c)} requests")
            rows[c] = await sections.load_server(self.generator, target, process.pid, c, self.count(c), owner_dsn)
            row = rows[c]
            self.log(f"  {row.rps:.0f} req/s, p50 {row.run.latency.p50:.1f} ms, p99 {row.run.latency.p99:.1f} ms, "
                     f"{row.errors} errors")  # fmt: skip
        if self.options.profile and owner_dsn:
            self.log(f"profile: py-spy on the server during one more run at concurrency {max(LEVELS)} (not reported)")
            async with recording(process.pid, self.options.profile):
                await self.generator.run(target, max(LEVELS), requests=self.count(max(LEVELS)))
        return rows

    async def rows_sections(
        self, server: Process, db: Database
    ) -> tuple[sections.ReadFigures, sections.PurgeFigures, sections.SoakFigures]:
        options = self.options
        self.log(f"seed: COPY {options.rows:,} rows ({SEALED_ROWS} sealed for Get), then VACUUM ANALYZE")
        seeded = await seed(db.owner_dsn, self.keyring, self.work, options.rows, SEALED_ROWS, RETENTION_DAYS)
        self.log(f"  copied in {seeded.copy_seconds:.1f} s, vacuumed in {seeded.vacuum_seconds:.1f} s; "
                 f"{seeded.expired:,} past retention")  # fmt: skip
        address = f"127.0.0.1:{self._port}"
        reads = await sections.reads(
            address, self.token, seeded.sealed_ids, self.work.body, options.list_repeats, options.gets,
            options.rows, self.log,
        )  # fmt: skip
        message = self.work.request.SerializeToString()
        purge = await sections.purge(
            address, self.token, message, options.purge_concurrency, options.purge_baseline_seconds, self.log
        )
        self.log(f"  purged {purge.purged:,} rows in {purge.seconds:.1f} s")
        self.log(f"soak: Store at concurrency {options.soak_concurrency} for {options.soak_seconds:.0f} s")
        soak = await sections.soak(
            self.generator, self.target(self._port), server.pid, options.soak_concurrency, options.soak_seconds,
            db.owner_dsn,
        )  # fmt: skip
        return reads, purge, soak

    @asynccontextmanager
    async def server(self, db: Database) -> AsyncIterator[Process]:
        self._port = free_port()
        env = server_env(self._server_settings(db) | dict(kv.split("=", 1) for kv in self.options.server_env))
        self.log(f"starting python -m server on 127.0.0.1:{self._port}")
        async with running(["-m", "server"], env, SERVER_READY, self.folder / "server.log") as server:
            self.log(f"  server pid {server.pid}")
            yield server

    def _server_settings(self, db: Database) -> dict[str, str]:
        return {
            "DATABASE_URL": db.server_dsn,
            "DEADLETTER_ENCRYPTION_KEYS": self.keys,
            "DEADLETTER_JWT_SECRET": self.jwt_secret,
            "DEADLETTER_ALLOW_PLAINTEXT": "true",
            "DEADLETTER_LISTEN": f"127.0.0.1:{self._port}",
            "DEADLETTER_METRICS_LISTEN": "off",
            "DEADLETTER_RETENTION_ENABLED": "false",
            "DEADLETTER_DB_POOL_MAX_SIZE": str(self.options.pool_size),
        }

    def _server_description(self) -> str:
        extra = "".join(f", {kv}" for kv in self.options.server_env)
        return (
            f"python -m server, plaintext on loopback, pool max {self.options.pool_size} connections, "
            f"log level INFO (one JSON line per call), metrics and daily retention off{extra}"
        )


def _machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal:")))
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({model}), {total_kib / 1024**2:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


async def _main(options: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="deadletter-bench-") as folder:
        return await Bench(options, Path(folder)).run()


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    markdown = asyncio.run(_main(options))
    print(markdown)
    if options.output:
        options.output.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
