# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Progress reporting and ``--nproc`` of the tools (issue 13): the demo
dataset generators write the same bytes whatever ``--nproc``."""
import filecmp
import os
import threading

import pytest

from _helpers import load_tool
from mmbhvit.utils.progress import produce_consume


def _tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_segmentation_generator_is_independent_of_nproc(tmp_path, capsys):
    tool = load_tool('dataset_converters/make_demo_dataset.py')
    one, four = tmp_path / 'one', tmp_path / 'four'
    tool.make_dataset(str(one), num_train=9, num_val=3, size=40, seed=5)
    tool.main([str(four), '--num-train', '9', '--num-val', '3', '--size',
               '40', '--seed', '5', '--nproc', '4'])
    a, b = _tree(one), _tree(four)
    assert len(a) == 2 * 12 + 1 and a == b  # images, labels, classes.json
    assert '12/12' in capsys.readouterr().err  # the tool's progress bar
    with pytest.raises(SystemExit, match='--nproc'):
        tool.main([str(tmp_path / 'x'), '--nproc', '0'])


def test_classification_generator_is_independent_of_nproc(tmp_path, capsys):
    tool = load_tool('dataset_converters/make_demo_cls_dataset.py')
    one, three = tmp_path / 'one', tmp_path / 'three'
    tool.make_dataset(str(one), num_train=3, num_val=2, size=32, seed=1)
    tool.main([str(three), '--num-train', '3', '--num-val', '2', '--size',
               '32', '--seed', '1', '--nproc', '3'])
    cmp = filecmp.dircmp(one, three)
    assert not cmp.left_only and not cmp.right_only
    a, b = _tree(one), _tree(three)
    assert len(a) == 5 * (3 + 2) + 1 and a == b
    assert '25/25' in capsys.readouterr().err


def test_produce_consume_order_errors_and_bounded_lookahead():
    produced, consumed, lock = [], [], threading.Lock()
    peak = [0]

    def items():
        for i in range(50):
            produced.append(i)
            with lock:
                peak[0] = max(peak[0], len(produced) - len(consumed))
            yield i

    def consume(i):
        with lock:
            consumed.append(i)

    assert produce_consume(items(), consume, total=50, nproc=3,
                           progress=False) == 50
    assert produced == list(range(50)) and sorted(consumed) == produced
    assert peak[0] <= 4 * 3 + 1  # never far ahead of the writers

    def fail(i):
        if i == 7:
            raise OSError(f'disk full at {i}')

    with pytest.raises(OSError, match='disk full at 7'):
        produce_consume(iter(range(100)), fail, total=100, nproc=2,
                        progress=False)
    with pytest.raises(ValueError, match='nproc'):
        produce_consume([], consume, total=0, nproc=0)


def test_check_parity_reports_progress_on_stderr(tmp_path, capsys):
    tool = load_tool('analysis_tools/check_parity.py')
    assert tool.main([str(tmp_path / 'missing')]) == 1
    err = capsys.readouterr().err
    assert f'[1/1] checking {tmp_path / "missing"}' in err
    assert 'error:' in err
