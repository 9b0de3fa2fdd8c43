# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The timing protocol of mmbhvit's benchmarks.

Cases compared with each other are timed in one process, interleaved: every
round runs each case once, in an order reversed every other round
(a, b, c, c, b, a, a, b, ...), so that load from other processes, warm
caches and the position in the round affect all cases alike. The first
``warmup`` rounds are not timed. With ``settle`` > 0 every call is preceded
by an untimed pause: a runtime whose worker threads keep spinning after
its call returns (ONNX Runtime's thread pool busy-waits for ~50 ms on one
core) would otherwise take that core from whichever case runs next. Used
by ``tools/analysis_tools/benchmark.py`` (binary vs full-precision PyTorch
models) and :mod:`mmbhvit.deploy.benchmark` (PyTorch vs the packed engine).
"""
import statistics
import time
from typing import Callable, Dict, Hashable, List, Mapping, Optional

__all__ = ['time_interleaved', 'summarize']


def time_interleaved(cases: Mapping[Hashable, Callable[[], object]],
                     repeats: int,
                     warmup: int = 0,
                     on_round: Optional[Callable[[int, int], None]] = None,
                     settle: float = 0.0) -> Dict[Hashable, List[float]]:
    """Time each callable of ``cases`` ``repeats`` times, interleaved.

    Args:
        cases: Case name to a callable without arguments (the timed call).
            The first round runs them in this order, the second in reverse,
            and so on.
        repeats (int): Timed rounds.
        warmup (int): Untimed rounds before the timed ones.
        on_round (callable, optional): Called as ``on_round(done, total)``
            after each round (warm-up included), e.g. to print progress.

    Returns:
        dict: Case name to its ``repeats`` wall-clock times in seconds, in
        round order (so the i-th times of two cases are from the same
        round, for paired comparisons).
    """
    if not settle >= 0:
        raise ValueError(f'settle must be >= 0 seconds, got {settle!r}')
    names = list(cases)
    times: Dict[Hashable, List[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            if settle > 0:
                time.sleep(settle)
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
        if on_round is not None:
            on_round(i + 1, warmup + repeats)
    return times


def summarize(times: List[float]) -> Dict[str, float]:
    """Median, min, max, quartiles (``q1``, ``q3``: inclusive method, so
    they stay within min–max) and inter-quartile range of ``times``, in the
    unit of ``times``."""
    if not times:
        raise ValueError('no times to summarize')
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method='inclusive')
    else:
        q1 = q3 = times[0]
    return dict(median=statistics.median(times), min=min(times),
                max=max(times), q1=q1, q3=q3, iqr=q3 - q1)


def median_lines(times: Mapping[Hashable, List[float]],
                 width: int = 12) -> List[str]:
    """One line per case of :func:`time_interleaved`'s result: its median
    and quartiles in ms (``times`` in seconds), names padded to ``width``."""
    lines = []
    for name, t in times.items():
        s = summarize(t)
        lines.append(f"  {str(name):<{width}} median "
                     f"{1e3 * s['median']:8.2f} ms (q1 {1e3 * s['q1']:.2f},"
                     f" q3 {1e3 * s['q3']:.2f})")
    return lines
