# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The timing protocol shared by the benchmarks (mmbhvit.utils.timing)."""
import pytest

from mmbhvit.utils.timing import summarize, time_interleaved


def test_rounds_alternate_order_and_skip_warmup():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
    times = time_interleaved(cases, repeats=3, warmup=1)
    # warm-up round, then 3 timed rounds; the order reverses every round
    assert ''.join(calls) == 'abc' 'cba' 'abc' 'cba'
    assert list(times) == ['a', 'b', 'c']
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())
    # progress: one call per round, warm-up included, after the round
    rounds = []
    time_interleaved(cases, repeats=2, warmup=1,
                     on_round=lambda done, total: rounds.append(
                         (done, total, len(calls))))
    assert rounds == [(1, 3, 15), (2, 3, 18), (3, 3, 21)]


def test_settle_sleeps_before_every_call(monkeypatch):
    import mmbhvit.utils.timing as timing
    events = []
    monkeypatch.setattr(timing.time, 'sleep',
                        lambda s: events.append(('sleep', s)))
    cases = {n: (lambda n=n: events.append(n)) for n in 'ab'}
    times = time_interleaved(cases, repeats=1, warmup=1, settle=0.25)
    # warm-up and timed calls alike, the pause outside the timed span
    assert events == [('sleep', 0.25), 'a', ('sleep', 0.25), 'b',
                      ('sleep', 0.25), 'b', ('sleep', 0.25), 'a']
    assert list(times) == ['a', 'b']
    events.clear()
    time_interleaved(cases, repeats=1)
    assert events == ['a', 'b']
    with pytest.raises(ValueError, match='settle'):
        time_interleaved(cases, repeats=1, settle=-1)
    with pytest.raises(ValueError, match='settle'):
        time_interleaved(cases, repeats=1, settle=float('nan'))


def test_settle_is_not_timed():
    times = time_interleaved({'noop': lambda: None}, repeats=2,
                             settle=0.05)
    assert all(t < 0.04 for t in times['noop'])


def test_summarize_by_hand():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    # inclusive quartiles of 1..5: 2 and 4
    assert s == dict(median=3.0, min=1.0, max=5.0, q1=2.0, q3=4.0, iqr=2.0)
    assert summarize([0.5]) == dict(median=0.5, min=0.5, max=0.5, q1=0.5,
                                    q3=0.5, iqr=0.0)
    with pytest.raises(ValueError):
        summarize([])
