"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
