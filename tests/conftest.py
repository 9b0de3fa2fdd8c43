# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Test isolation for mmengine's global default scope.

Building from ``mmpretrain.registry.MODELS`` while the default scope is
``mmseg`` (or the reverse) looks in the wrong registry, and a Runner leaves
its scope behind. Each test therefore starts with no default scope, or with
the one its module names in ``DEFAULT_SCOPE``, and the previous state is
restored afterwards.
"""
import os

import pytest


def pytest_configure(config):
    # as the tools on a CPU machine: freed tensors stay in the process
    # (mmbhvit.utils.malloc; about a quarter less time in model tests)
    from mmbhvit.utils.malloc import keep_freed_memory
    keep_freed_memory()
    # pytest-xdist workers (`make test`) share the cores: torch threads
    # split between them, or each worker's ops wait on the other's
    workers = os.environ.get('PYTEST_XDIST_WORKER_COUNT')
    if workers:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
    # `make test` runs everything; `make test-quick` (`-m "not slow"`) leaves
    # out the tests that take more than a few seconds.
    config.addinivalue_line(
        'markers', 'slow: takes more than a few seconds (Runner training, '
        'tools in subprocesses, torchrun, full-size models, kernel sweeps); '
        'left out by make test-quick')


@pytest.fixture(autouse=True)
def _isolated_default_scope(request):
    from mmengine.registry import DefaultScope
    saved = dict(DefaultScope._instance_dict)
    DefaultScope._instance_dict.clear()
    scope = getattr(request.module, 'DEFAULT_SCOPE', None)
    if scope:
        DefaultScope.get_instance(f'pytest-{scope}', scope_name=scope)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
