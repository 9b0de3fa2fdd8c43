# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Error-message helpers: long lists are cut to their first items and the
count of the rest, the same way in every message."""
from typing import Iterable

__all__ = ['first_items']


def first_items(items: Iterable, limit: int, sep: str = ', ') -> str:
    """The first ``limit`` of ``items`` (as ``str``) joined by ``sep``,
    followed by ``... and N more`` when there are more."""
    items = [str(item) for item in items]
    shown = sep.join(items[:limit])
    if len(items) > limit:
        shown += f'{sep}... and {len(items) - limit} more'
    return shown
