"""The benches' one timer: the median wall time of `fn()` over `repeats` calls after a warm-up."""

import statistics
import time


def median_time(fn, repeats: int, warmup=None) -> float:
    """Median seconds of `fn()` over `repeats` calls; one call first warms up (tracing,
    compilation), of `warmup()` where given (a cheaper call that compiles the same programs).
    `fn` must block until its result is ready."""
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
