# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Run one of mmsegmentation's own tool scripts on mmbhvit configs.

    python tools/mmseg_tool.py TOOL [ARGS ...]
    python tools/mmseg_tool.py --list

TOOL is a script shipped inside the installed mmseg package
(``mmseg/.mim/tools``), named by its path there without ``.py``
(``analysis_tools/browse_dataset``, ``misc/print_config``) or, when no other
script has the same file name, by that name alone (``print_config``,
``confusion_matrix``). ARGS are the script's own arguments.

Under mmcv-lite these scripts stop at import (``No module named
'mmcv._ext'``: mmseg imports compiled mmcv ops at module level). This
launcher imports :mod:`mmbhvit` first, which installs mmbhvit's light
``mmcv.ops`` (nothing changes with full mmcv) and registers the mmbhvit
modules, then runs the script as ``python SCRIPT ARGS`` would (``__main__``,
``sys.argv``, ``sys.path[0]`` = its folder). The script's exit status is
this tool's.

Two fixes are applied while a script runs:

* mmseg 1.2.2's ``SegLocalVisualizer`` draws the class labels with OpenCV
  into an array laid out like the image it is given, and ``browse_dataset``
  gives it a transposed tensor view, which OpenCV 5 refuses ("Layout of the
  output array img is incompatible with cv::Mat"): the visualizer gets a
  contiguous copy of the image (same pixels);
* ``confusion_matrix`` reads the class names from ``dataset.METAINFO``, the
  dataset *class*'s fixed metadata, which is empty for datasets whose
  classes come with the data (``RSLVFDataset`` reads ``classes.json``):
  datasets built from ``mmseg.registry.DATASETS`` get an instance
  ``METAINFO`` holding their resolved classes and palette.

Examples (demo config, data from ``make demo``)::

    python tools/mmseg_tool.py print_config \\
        configs/bhvit/upernet_bhvit-tiny_demo-shapes.py
    python tools/mmseg_tool.py analysis_tools/browse_dataset \\
        configs/bhvit/upernet_bhvit-tiny_demo-shapes.py \\
        --not-show --output-dir work_dirs/browse
    python tools/test.py CONFIG CKPT --out work_dirs/pred   # label PNGs
    python tools/mmseg_tool.py confusion_matrix CONFIG work_dirs/pred \\
        work_dirs/confusion
"""
import contextlib
import functools
import os
import os.path as osp
import runpy
import sys
from typing import Dict, List, Optional

#: mmseg's own training/testing scripts: mmbhvit's tools/train.py and
#: tools/test.py replace them (strict checkpoint loading, data checks).
REPLACED = {
    'train': 'tools/train.py',
    'test': 'tools/test.py',
}


class UnknownToolError(ValueError):
    """The tool name matches no script of mmseg (or several)."""


def mmseg_tools_dir() -> str:
    """``mmseg/.mim/tools`` of the installed mmsegmentation."""
    import importlib.util
    spec = importlib.util.find_spec('mmseg')
    if spec is None or not spec.submodule_search_locations:
        raise UnknownToolError('mmsegmentation is not installed')
    root = osp.join(list(spec.submodule_search_locations)[0], '.mim',
                    'tools')
    if not osp.isdir(root):
        raise UnknownToolError(
            f'{root} does not exist: this mmsegmentation installation does '
            'not ship its tool scripts (an editable install of mmseg keeps '
            'them in its repository: run them from there)')
    return root


def available_tools(root: Optional[str] = None) -> Dict[str, str]:
    """``{'analysis_tools/browse_dataset': '/.../browse_dataset.py', ...}``:
    every script under ``root`` (default: :func:`mmseg_tools_dir`)."""
    root = root or mmseg_tools_dir()
    tools = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '_')))
        for name in sorted(files):
            if name.endswith('.py') and not name.startswith('_'):
                path = osp.join(folder, name)
                rel = osp.relpath(path, root)[:-len('.py')]
                tools[rel.replace(os.sep, '/')] = path
    return tools


def _listing(tools: Dict[str, str]) -> str:
    short: Dict[str, List[str]] = {}
    for rel in tools:
        short.setdefault(rel.rsplit('/', 1)[-1], []).append(rel)
    lines = []
    for rel in tools:
        name = rel.rsplit('/', 1)[-1]
        if name in REPLACED:
            continue
        alias = f'  (or {name})' if len(short[name]) == 1 and \
            '/' in rel else ''
        lines.append(f'  {rel}{alias}')
    return '\n'.join(lines)


def resolve_tool(name: str, root: Optional[str] = None) -> str:
    """The script path of tool ``name``.

    ``name`` is a path under mmseg's tools folder, with or without a
    leading ``tools/`` and a trailing ``.py``, or a file name that only one
    script has.

    Raises:
        UnknownToolError: no such script, several scripts of that name
            (the message lists them), or mmseg's train/test (use ours).
    """
    tools = available_tools(root)
    key = name.replace('\\', '/')
    if key.startswith('tools/'):
        key = key[len('tools/'):]
    if key.endswith('.py'):
        key = key[:-len('.py')]
    if key in REPLACED:
        raise UnknownToolError(
            f'mmseg\'s tools/{key}.py is not run through this launcher: use '
            f'mmbhvit\'s {REPLACED[key]} (strict checkpoint loading, data '
            'checks)')
    if key in tools:
        return tools[key]
    matches = [rel for rel in tools if rel.rsplit('/', 1)[-1] == key]
    if len(matches) == 1:
        return tools[matches[0]]
    if len(matches) > 1:
        raise UnknownToolError(
            f'tool {name!r} is ambiguous: mmseg ships '
            f'{", ".join(matches)}; give one of these names')
    raise UnknownToolError(
        f'unknown tool {name!r}. The tools of mmseg in '
        f'{root or mmseg_tools_dir()}:\n{_listing(tools)}')


@contextlib.contextmanager
def contiguous_visualizer_images():
    """While active, ``SegLocalVisualizer.add_datasample`` receives a
    C-contiguous copy of a non-contiguous image (see the module doc)."""
    import numpy as np
    from mmseg.visualization import SegLocalVisualizer
    original = SegLocalVisualizer.__dict__['add_datasample']

    @functools.wraps(original)
    def add_datasample(self, name, image, *args, **kwargs):
        if isinstance(image, np.ndarray):
            image = np.ascontiguousarray(image)
        return original(self, name, image, *args, **kwargs)

    SegLocalVisualizer.add_datasample = add_datasample
    try:
        yield
    finally:
        SegLocalVisualizer.add_datasample = original


@contextlib.contextmanager
def instance_metainfo():
    """While active, a dataset built by ``mmseg.registry.DATASETS`` whose
    class ``METAINFO`` has no ``classes`` gets an instance ``METAINFO`` with
    its own resolved ``classes`` and ``palette`` (see the module doc)."""
    from mmseg.registry import DATASETS
    original = DATASETS.build
    own = vars(DATASETS).get('build')  # normally none: the class's method

    def build(cfg, *args, **kwargs):
        dataset = original(cfg, *args, **kwargs)
        meta = getattr(dataset, 'metainfo', None)
        if 'classes' not in getattr(type(dataset), 'METAINFO', {}) and \
                isinstance(meta, dict) and 'classes' in meta:
            dataset.METAINFO = dict(
                type(dataset).METAINFO,
                **{k: meta[k] for k in ('classes', 'palette') if k in meta})
        return dataset

    DATASETS.build = build
    try:
        yield
    finally:
        if own is None:
            del DATASETS.build
        else:
            DATASETS.build = own


def run_tool(name: str, args: List[str]) -> None:
    """Run mmseg's tool ``name`` with ``args`` in this process, after
    ``import mmbhvit`` (mmcv-lite shim, registries)."""
    script = resolve_tool(name)
    import mmbhvit  # noqa: F401  (before the script imports mmseg)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script] + list(args)
    sys.path.insert(0, osp.dirname(script))
    try:
        with contiguous_visualizer_images(), instance_metainfo():
            runpy.run_path(script, run_name='__main__')
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
        return
    if argv[0] == '--list':
        print(f'mmseg tools in {mmseg_tools_dir()}:\n'
              f'{_listing(available_tools())}')
        return
    try:
        run_tool(argv[0], argv[1:])
    except UnknownToolError as e:
        sys.stderr.write(f'error: {e}\n')
        sys.exit(2)


if __name__ == '__main__':
    main()
