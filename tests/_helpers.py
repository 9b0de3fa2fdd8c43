# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Shared by the test modules: load the repository's scripts (tools/,
demo/) as modules, the way a user runs them, without packaging them."""
import importlib.util
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_script(path: str, name: str = None):
    """Import the Python file ``path`` (absolute, or relative to the
    repository) as a fresh module."""
    if not osp.isabs(path):
        path = osp.join(REPO, path)
    if name is None:
        name = '_script_' + osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(rel: str):
    """``tools/<rel>`` (e.g. ``'deployment/export_binary.py'``) as a
    module."""
    return load_script(osp.join('tools', rel))


def make_shapes(folder, num_train: int = 8, num_val: int = 2,
                size: int = 64, seed: int = 3) -> str:
    """A small "demo shapes" dataset (tools/dataset_converters/
    make_demo_dataset.py) in ``folder/shapes``; returns its root."""
    maker = load_script(osp.join('tools', 'dataset_converters',
                                 'make_demo_dataset.py'), 'make_demo_dataset')
    root = osp.join(str(folder), 'shapes')
    maker.make_dataset(root, num_train=num_train, num_val=num_val, size=size,
                       seed=seed)
    return root
