"""Helpers for turning run records into tables: mean and spread, number formats, a Markdown table."""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence


def mean_std(values: Iterable[Optional[float]]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan, nan if none; std nan for one value)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def fmt(value: Optional[float], digits: int = 4, missing: str = "–") -> str:
    """``value`` with ``digits`` decimals, or ``missing`` for None, nan and inf."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` / ``|---|---|`` / one line per row (cells are ``str()``-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
