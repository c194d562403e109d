"""Percentiles and small formatting helpers shared by the benchmark's sections."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Latency:
    """Latency figures in milliseconds."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, milliseconds: Sequence[float]) -> Latency:
        return cls(
            len(milliseconds),
            percentile(milliseconds, 50),
            percentile(milliseconds, 99),
            max(milliseconds) if milliseconds else math.nan,
        )


def ms(value: float) -> str:
    """A latency for a table cell."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.0f}%"


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"
