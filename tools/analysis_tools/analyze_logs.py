# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Plot training curves from mmengine JSON logs.

    python tools/analysis_tools/analyze_logs.py plot_curve \
        work_dirs/RUN/TIMESTAMP/vis_data/scalars.json [LOG2.json ...] \
        --keys loss mIoU --out curve.png [--legend a b] [--xkey step]

A log is mmengine's ``vis_data/scalars.json`` (or ``TIMESTAMP.json``):
one JSON dict per line, written by ``LocalVisBackend``. Training lines hold
``loss``, ``lr``, ... with ``step`` (= iteration), validation lines hold
the metrics (``mIoU``, ``accuracy/top1``, ...) with ``step`` (= iteration
for iteration-based runs, epoch for epoch-based runs). Each key is drawn
in its own panel against ``--xkey`` (default ``step``, else ``iter``, else
``epoch``), one line per log. Lines without the key are skipped; a key
that no line of a log holds is an error (the available keys are listed).
"""
import argparse
import json
import os.path as osp
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

X_KEYS = ('step', 'iter', 'epoch')


class LogKeyError(KeyError):
    """A requested key is missing from a log."""

    def __str__(self):
        return str(self.args[0])


def load_json_log(path: str) -> List[dict]:
    """The dict records of a JSON-lines log (blank lines skipped)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'log file not found: {path}')
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno}: not a JSON line ({e.msg})'
                                 ) from None
            if isinstance(record, dict):
                records.append(record)
    return records


def available_keys(records: Sequence[dict]) -> List[str]:
    keys = OrderedDict()
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def pick_xkey(records: Sequence[dict], xkey: Optional[str], path: str) -> str:
    if xkey is not None:
        if not any(xkey in r for r in records):
            raise LogKeyError(f'x-axis key {xkey!r} not found in {path}')
        return xkey
    for k in X_KEYS:
        if any(k in r for r in records):
            return k
    raise LogKeyError(f'{path} has none of the x-axis keys {X_KEYS}')


def extract_series(records: Sequence[dict], key: str, xkey: str,
                   path: str = '<log>') -> Tuple[List[float], List[float]]:
    """``(xs, ys)`` of ``key`` over the records that hold both keys."""
    xs, ys = [], []
    for r in records:
        if key in r and xkey in r:
            xs.append(r[xkey])
            ys.append(r[key])
    if not ys:
        keys = [k for k in available_keys(records) if k not in X_KEYS]
        raise LogKeyError(f'key {key!r} not found in {path} (with x-axis '
                          f'{xkey!r}); available keys: {", ".join(keys)}')
    return xs, ys


def default_label(path: str) -> str:
    """``RUN/TIMESTAMP`` for mmengine's ``RUN/TIMESTAMP/vis_data/*.json``,
    else the file name without extension."""
    parts = osp.abspath(path).split(osp.sep)
    if len(parts) >= 4 and parts[-2] == 'vis_data':
        return f'{parts[-4]}/{parts[-3]}'
    return osp.splitext(osp.basename(path))[0]


def plot_curve(logs: Sequence[str], keys: Sequence[str], out: str,
               legend: Optional[Sequence[str]] = None,
               xkey: Optional[str] = None,
               title: Optional[str] = None) -> Dict[str, Dict[str, tuple]]:
    """Draw ``keys`` of every log into ``out`` (one panel per key).

    Returns ``{key: {legend: (xs, ys)}}``, the plotted data.
    """
    if legend is None:
        legend = [default_label(p) for p in logs]
        if len(set(legend)) < len(legend):
            legend = list(logs)
    if len(legend) != len(logs):
        raise ValueError(f'{len(legend)} legend entries for {len(logs)} logs')
    # read and check everything before drawing anything
    series: Dict[str, Dict[str, tuple]] = OrderedDict(
        (k, OrderedDict()) for k in keys)
    xlabels = []
    for path, name in zip(logs, legend):
        records = load_json_log(path)
        x = pick_xkey(records, xkey, path)
        xlabels.append(x)
        for k in keys:
            series[k][name] = extract_series(records, k, x, path)

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 3.2 * len(keys)),
                             squeeze=False)
    for ax, (k, lines) in zip(axes[:, 0], series.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=name, marker='.' if len(xs) < 30 else None)
        ax.set_ylabel(k)
        ax.set_xlabel(' / '.join(sorted(set(xlabels))))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_dir = osp.dirname(osp.abspath(out))
    if not osp.isdir(out_dir):
        raise FileNotFoundError(f'output directory does not exist: {out_dir}')
    from mmbhvit.utils.io import atomic_write
    fmt = osp.splitext(out)[1].lstrip('.').lower() or 'png'
    try:
        with atomic_write(out, 'wb') as f:
            fig.savefig(f, format=fmt)
    finally:
        plt.close(fig)
    return series


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Analyze mmengine JSON logs')
    sub = parser.add_subparsers(dest='task', required=True)
    p = sub.add_parser('plot_curve', help='plot scalar curves')
    p.add_argument('logs', nargs='+', help='JSON log files (scalars.json)')
    p.add_argument('--keys', nargs='+', default=['loss'],
                   help='scalars to plot, one panel each')
    p.add_argument('--legend', nargs='+', default=None,
                   help='one name per log (default: the run directory)')
    p.add_argument('--xkey', default=None,
                   help=f'x-axis key (default: the first of {X_KEYS} found)')
    p.add_argument('--title', default=None)
    p.add_argument('--out', default='curve.png', help='output image file')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        series = plot_curve(args.logs, args.keys, args.out, args.legend,
                            args.xkey, args.title)
    except (LogKeyError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f'error: {e}\n')
        sys.exit(2)
    print(f'plotted {", ".join(args.keys)} of {len(args.logs)} log(s) to '
          f'{args.out}')
    return series


if __name__ == '__main__':
    main()
