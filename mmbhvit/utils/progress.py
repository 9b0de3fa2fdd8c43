# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Progress bars and ordered-produce / parallel-consume loops for the tools.

The dataset generators draw every sample from one random stream, in order
(so that the files only depend on the seed), and spend most of their time
encoding and writing the images. :func:`produce_consume` keeps the drawing
in the calling thread, in order, and hands each item to ``nproc`` worker
threads (PNG encoding and file I/O release the GIL), with at most
``4 * nproc`` items waiting: the output does not depend on ``nproc``.
"""
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

__all__ = ['progress_bar', 'produce_consume']

T = TypeVar('T')


class _NoBar:

    def update(self, num_tasks: int = 1) -> None:
        pass


def progress_bar(total: int, enabled: bool = True, file=None):
    """mmengine's ``ProgressBar`` over ``total`` tasks (on stderr by
    default, so that a tool's results on stdout stay clean), or a bar that
    prints nothing when ``enabled`` is False or ``total`` is 0."""
    if not enabled or total <= 0:
        return _NoBar()
    from mmengine.utils import ProgressBar
    return ProgressBar(total, file=file or sys.stderr)


def produce_consume(items: Iterable[T],
                    consume: Callable[[T], None],
                    total: int,
                    nproc: int = 1,
                    progress: bool = True) -> int:
    """Call ``consume(item)`` for every item of ``items``.

    ``items`` is iterated in this thread, in order; with ``nproc > 1`` the
    ``consume`` calls run in ``nproc`` threads (at most ``4 * nproc``
    items produced ahead). The first exception raised by ``consume`` is
    re-raised here. A progress bar over ``total`` is drawn unless
    ``progress`` is False.

    Returns:
        int: the number of items consumed.
    """
    if nproc < 1:
        raise ValueError(f'nproc must be at least 1, got {nproc}')
    bar = progress_bar(total, progress)
    done = 0
    if nproc == 1:
        for item in items:
            consume(item)
            done += 1
            bar.update()
        return done
    pending = deque()
    with ThreadPoolExecutor(max_workers=nproc) as pool:
        try:
            for item in items:
                pending.append(pool.submit(consume, item))
                while len(pending) >= 4 * nproc:
                    pending.popleft().result()
                    done += 1
                    bar.update()
            while pending:
                pending.popleft().result()
                done += 1
                bar.update()
        finally:
            for future in pending:  # after an error: drop what is queued
                future.cancel()
    return done
