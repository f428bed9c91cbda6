"""The benches' one timer: the median wall time of `fn()` over `repeats` calls after a warm-up."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls; one call first warms up (tracing,
    compilation). `fn` must block until its result is ready."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
