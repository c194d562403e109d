"""The markdown the benchmark prints: a header, one table per section, and the issue-6 targets beside them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.sections import PurgeFigures, ReadFigures, SoakFigures, StoreRow
from bench.stats import Latency, mib, ms, percent, ratio

# Issue 6's targets, as numbers; "Met" cells only compare measurements with these.
STORE_SHARE_OF_BARE = 0.70
STORE_P99_MS = 50.0
READ_P99_MS = 20.0
PURGE_P99_FACTOR = 2.0
# How the two qualitative targets are read: the deep page's p50 within this factor of the first page's, and
# RSS growth after warm-up within this share of the warm-up RSS.
DEEP_PAGE_FACTOR = 1.5
MEMORY_GROWTH_SHARE = 0.05


@dataclass(frozen=True)
class Header:
    date: str
    machine: str
    postgres: str
    generator: str
    server: str
    command: str


@dataclass(frozen=True)
class StoreFigures:
    levels: tuple[int, ...]
    shapes: dict[int, str]
    real: dict[int, StoreRow]
    bare: dict[int, StoreRow]
    raw: dict[int, StoreRow]
    raw_connections: dict[int, int]


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def header(h: Header) -> str:
    return "\n".join(
        [
            "# deadletter benchmark",
            "",
            f"- Date: {h.date}",
            f"- Machine: {h.machine}",
            f"- PostgreSQL: {h.postgres}",
            f"- Load generator: {h.generator}",
            f"- Server: {h.server}",
            f"- Command: `{h.command}`",
        ]
    )


def store_section(s: StoreFigures) -> str:
    rows = []
    for c in s.levels:
        for name, row, extra in (
            ("deadletter Store", s.real[c], ""),
            ("(a) bare grpc.aio", s.bare[c], ""),
            ("(b) raw asyncpg INSERT", s.raw[c], f" ({s.raw_connections[c]} conn.)"),
        ):
            rows.append(
                [
                    str(c),
                    name + extra,
                    str(row.run.sent),
                    str(row.errors),
                    f"{row.rps:.0f}",
                    ms(row.run.latency.p50),
                    ms(row.run.latency.p99),
                    mib(row.peak_kib),
                ]
            )
    first = table(["Concurrency", "Measured", "Requests", "Errors", "Req/s", "p50 ms", "p99 ms", "Peak RSS MiB"], rows)
    ratios = []
    for c in s.levels:
        real = s.real[c]
        share = ratio(real.rps, s.bare[c].rps)
        target, verdict = "—", "—"
        if c == max(s.levels):
            target = f"≥ {STORE_SHARE_OF_BARE:.0%} of (a), p99 < {STORE_P99_MS:.0f} ms, no errors"
            verdict = met(share >= STORE_SHARE_OF_BARE and real.run.latency.p99 < STORE_P99_MS and real.errors == 0)
        ratios.append(
            [str(c), percent(share), percent(ratio(real.rps, s.raw[c].rps)), ms(real.run.latency.p99), target, verdict]
        )
    second = table(["Concurrency", "Store / (a)", "Store / (b)", "Store p99 ms", "Issue-6 target", "Met"], ratios)
    shapes = ", ".join(f"{c}: {shape}" for c, shape in s.shapes.items())
    return "\n\n".join(
        [
            "## Store",
            "Each request is one 2,048-byte WhatsApp webhook with its headers and a service token. Errors are "
            "requests minus the rows PostgreSQL really gained (bare server: responses that were not HTTP 200). "
            "Req/s counts successes. Peak RSS is the process's VmHWM during that run (reset before it). "
            f"Load shape ({shapes}).",
            first,
            second,
        ]
    )


def reads_section(r: ReadFigures) -> str:
    rows = []
    for figures in r.lists:
        provider = figures.provider or "every provider"
        rows.append(_read_row("List", provider, "1", figures.first, ""))
        deep_vs_first = ratio(figures.deep.p50, figures.first.p50)
        rows.append(
            _read_row(
                "List",
                provider,
                f"{figures.deep_page} (walked)",
                figures.deep,
                f"{deep_vs_first:.2f}x page 1 (≈ 1x: {met(deep_vs_first <= DEEP_PAGE_FACTOR)})",
            )
        )
        rows.append(_read_row("List, walking down", provider, f"1-{figures.walk.count}, once each", figures.walk, ""))
    rows.append(_read_row("Get", "—", "—", r.get, f"{r.get_errors} wrong payloads" if r.get_errors else ""))
    return "\n\n".join(
        [
            f"## List and Get at {r.rows:,} rows",
            "One request at a time through the real server (grpc.aio client, service token), page_size 50. Page 1 "
            "and the deep page are repeated; the deep page is requested with the token the walk reached it with.",
            table(["Request", "Filter", "Page", "n", "p50 ms", "p99 ms", "max ms", "p99 < 20 ms", "Note"], rows),
        ]
    )


def _read_row(name: str, provider: str, page: str, latency: Latency, note: str) -> list[str]:
    return [
        name,
        provider,
        page,
        str(latency.count),
        ms(latency.p50),
        ms(latency.p99),
        ms(latency.max),
        met(latency.p99 < READ_P99_MS),
        note,
    ]


def purge_section(p: PurgeFigures, rows: int) -> str:
    factor = ratio(p.during.p99, p.without.p99)
    body = table(
        ["", "Without a purge", "During the purge", "Issue-6 target", "Met"],
        [
            ["Store req/s", f"{p.without_rps:.0f}", f"{p.during_rps:.0f}", "", ""],
            ["Store p50 ms", ms(p.without.p50), ms(p.during.p50), "", ""],
            [
                "Store p99 ms",
                ms(p.without.p99),
                ms(p.during.p99),
                f"during ≤ {PURGE_P99_FACTOR:.0f}x without ({factor:.2f}x)",
                met(factor <= PURGE_P99_FACTOR),
            ],
            ["Store requests answered OK", str(p.without.count), str(p.during.count), "", ""],
            ["Store errors", str(p.without_errors), str(p.during_errors), "", ""],
        ],
    )
    return "\n\n".join(
        [
            "## Purge",
            f"Purge with no cut-off (the 90-day retention) deleted **{p.purged:,}** of {rows:,} seeded rows in "
            f"**{p.seconds:.1f} s** ({ratio(p.purged, p.seconds):,.0f} rows/s), while a grpc.aio client kept "
            f"{p.concurrency} Stores in flight. The bulk rows carry a small sealed payload, so a purge of real "
            "2 KiB (TOASTed) payloads deletes more bytes than this one.",
            body,
        ]
    )


def soak_section(s: SoakFigures) -> str:
    growth = s.end_kib - s.warm_kib
    share = ratio(growth, s.warm_kib)
    latency = s.row.run.latency
    body = table(
        [
            "Store load",
            "Req/s",
            "Errors",
            "p50 ms",
            "p99 ms",
            "RSS at start",
            "after warm-up",
            "at the end",
            "growth",
            "slope after warm-up",
            "peak",
            "Flat (≤ 5% growth)",
        ],
        [
            [
                f"{s.seconds:.0f} s at concurrency {s.concurrency}",
                f"{s.row.rps:.0f}",
                str(max(0, s.row.errors)),
                ms(latency.p50),
                ms(latency.p99),
                f"{mib(s.start_kib)} MiB",
                f"{mib(s.warm_kib)} MiB",
                f"{mib(s.end_kib)} MiB",
                f"{growth / 1024:+.1f} MiB ({share * 100:+.1f}%)",
                f"{s.slope_kib_per_minute / 1024:+.2f} MiB/min",
                f"{mib(s.row.peak_kib)} MiB",
                met(not math.isnan(share) and share <= MEMORY_GROWTH_SHARE),
            ]
        ],
    )
    trace = ", ".join(f"{t:.0f}s {kib / 1024:.0f}" for t, kib in s.samples)
    return "\n\n".join(
        [
            "## Memory",
            f"The server's RSS (VmRSS) every 5 s under a sustained Store load; warm-up is the first "
            f"{int(s.seconds * 0.2)} s.",
            body,
            f"RSS samples (MiB): {trace}",
        ]
    )


def summary(store: StoreFigures, reads: ReadFigures, purge: PurgeFigures, soak: SoakFigures) -> str:
    top = max(store.levels)
    real = store.real[top]
    share = ratio(real.rps, store.bare[top].rps)
    read_p99 = max([f.first.p99 for f in reads.lists] + [f.deep.p99 for f in reads.lists])
    deep = max(ratio(f.deep.p50, f.first.p50) for f in reads.lists)
    factor = ratio(purge.during.p99, purge.without.p99)
    growth = ratio(soak.end_kib - soak.warm_kib, soak.warm_kib)
    rows = [
        [f"Store at concurrency {top} ≥ 70% of the bare grpc.aio ceiling", percent(share),
         met(share >= STORE_SHARE_OF_BARE)],
        [f"Store p99 at concurrency {top} < 50 ms", f"{ms(real.run.latency.p99)} ms",
         met(real.run.latency.p99 < STORE_P99_MS)],
        ["Every Store acknowledged was written (errors = requests - rows)", str(real.errors), met(real.errors == 0)],
        [f"List p99 < 20 ms at {reads.rows:,} rows (worst of page 1 and deep page, both filters)",
         f"{ms(read_p99)} ms", met(read_p99 < READ_P99_MS)],
        [f"Get p99 < 20 ms at {reads.rows:,} rows", f"{ms(reads.get.p99)} ms", met(reads.get.p99 < READ_P99_MS)],
        ["Deep page as fast as the first (p50 within 1.5x)", f"{deep:.2f}x", met(deep <= DEEP_PAGE_FACTOR)],
        ["Store p99 during the purge ≤ 2x without", f"{factor:.2f}x", met(factor <= PURGE_P99_FACTOR)],
        ["Memory flat after warm-up (growth ≤ 5%)", f"{growth * 100:+.1f}%",
         met(not math.isnan(growth) and growth <= MEMORY_GROWTH_SHARE)],
    ]  # fmt: skip
    return "\n\n".join(["## Against the issue-6 targets", table(["Target", "Measured", "Met"], rows)])
