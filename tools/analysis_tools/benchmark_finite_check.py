# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost of the non-finite checks per training step.

    python tools/analysis_tools/benchmark_finite_check.py \
        [configs/bhvit/upernet_bhvit-tiny_demo-shapes.py] \
        [--repeats 20] [--threads 2] [--batch-size N] [--size H W]

Times complete training steps (``model.train_step``: data preprocessor,
forward, loss, backward, optimizer step) of the config's model on a
synthetic batch (the config's batch size and crop size), alternately

* **with the checks**: :class:`~mmbhvit.engine.NonFiniteCheckHook`
  attached as the configs use it (input check, snapshot of the running
  statistics, loss check; ``--check-grads`` adds the optional gradient
  check) and the BHViT backbone's own input check;
* **without**: the hook detached and the backbone's finite test disabled,

interleaved (the order flips every round, so machine noise hits both
alike), and prints the medians and their difference. Because that
difference is small next to the noise of a shared machine, it also times
the check code itself inside the "with" steps (every hook callback and the
backbone's test), which is the overhead proper.
"""
import argparse
import logging
import os
import os.path as osp
import statistics
import sys
import time
from functools import wraps
from types import SimpleNamespace

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import mmbhvit  # noqa: E402,F401
from mmbhvit.apis import build_model, load_config, task_of  # noqa: E402
from mmbhvit.engine import NonFiniteCheckHook  # noqa: E402
from mmbhvit.models.backbones import bhvit as bhvit_module  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402

DEMO_CONFIG = osp.join('configs', 'bhvit', 'upernet_bhvit-tiny_demo-shapes.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', nargs='?', default=DEMO_CONFIG)
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed steps per variant (after 2 warm-ups)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=None,
                        help="default: the config's train batch size")
    parser.add_argument('--size', type=int, nargs=2, default=None,
                        metavar=('H', 'W'),
                        help="default: the config's crop_size (else 224)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--check-grads', action='store_true',
                        help='also the optional gradient check '
                        '(NonFiniteCheckHook(check_grads=True))')
    return parser.parse_args(argv)


def synthetic_batch(task: str, batch_size: int, size, num_classes: int,
                    gen: torch.Generator) -> dict:
    """A batch as the data loader gives it (uint8 images, data samples)."""
    h, w = size
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                            generator=gen) for _ in range(batch_size)]
    samples = []
    for i in range(batch_size):
        meta = dict(img_path=f'synthetic_{i}.png', img_shape=(h, w),
                    ori_shape=(h, w), pad_shape=(h, w))
        if task == 'segmentation':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(
                0, num_classes, (1, h, w), generator=gen))
        else:
            from mmpretrain.structures import DataSample
            sample = DataSample(metainfo=meta).set_gt_label(
                int(torch.randint(0, num_classes, (1, ), generator=gen)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_classes(cfg) -> int:
    model = cfg.model
    for key in ('decode_head', 'head'):
        head = model.get(key)
        if isinstance(head, dict) and 'num_classes' in head:
            return int(head['num_classes'])
    raise ValueError('cannot find num_classes in the config model')


class CheckTimer:
    """Accumulates the time spent in the wrapped callables."""

    def __init__(self):
        self.total = 0.

    def wrap(self, fn):

        @wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    cfg = load_config(args.config)
    task = task_of(cfg)
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    scope = 'mmseg' if task == 'segmentation' else 'mmpretrain'
    model = build_model(cfg).train()
    with DefaultScope.overwrite_default_scope(scope):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    batch_size = args.batch_size or cfg.train_dataloader.batch_size
    size = args.size or cfg.get('crop_size') or (224, 224)
    if task == 'classification' and args.size is None:
        size = (224, 224)
    gen = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(task, batch_size, tuple(size), _num_classes(cfg),
                            gen)

    timer = CheckTimer()
    hook = NonFiniteCheckHook(check_grads=args.check_grads)
    for name in ('_before_forward', '_after_forward', '_before_step'):
        setattr(hook, name, timer.wrap(getattr(hook, name)))
    checked_backbone_test = timer.wrap(bhvit_module.check_finite_input)

    def set_checks(on: bool):
        if on:
            hook.attach(model, optim_wrapper)
            bhvit_module.check_finite_input = checked_backbone_test
        else:
            hook.detach()
            bhvit_module.check_finite_input = lambda *a, **k: None

    def step(on: bool, i: int) -> float:
        set_checks(on)
        fake_runner = SimpleNamespace(iter=i, epoch=0)
        hook.before_train_iter(fake_runner, i)
        start = time.perf_counter()
        model.train_step(batch, optim_wrapper)
        elapsed = time.perf_counter() - start
        hook.after_train_iter(fake_runner, i)  # drops the snapshot
        return elapsed

    print(f'CPU: {cpu_description()}')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'config {osp.basename(args.config)} ({task}), batch '
          f'{batch_size} x 3 x {size[0]} x {size[1]}, {args.repeats} steps '
          'per variant after 2 warm-ups, interleaved; checks: inputs, loss'
          + (', gradients' if args.check_grads else ''))
    for i in range(2):
        step(True, i)
        step(False, i)
    times = {True: [], False: []}
    check_time = []
    for r in range(args.repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            before = timer.total
            times[on].append(step(on, r))
            if on:
                check_time.append(timer.total - before)
    set_checks(True)

    med_on = statistics.median(times[True])
    med_off = statistics.median(times[False])
    med_check = statistics.median(check_time)

    def spread(ts):
        return f'{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}'

    print(f'step without checks : median {med_off * 1e3:8.1f} ms '
          f'(min-max {spread(times[False])})')
    print(f'step with checks    : median {med_on * 1e3:8.1f} ms '
          f'(min-max {spread(times[True])})')
    print(f'difference of the medians: {(med_on - med_off) * 1e3:+.2f} ms '
          f'({(med_on - med_off) / med_off * 100:+.2f} %; compare with the '
          'spreads above)')
    print(f'time inside the checks: median {med_check * 1e3:.3f} ms per '
          f'step = {med_check / med_off * 100:.3f} % of a step '
          f'(min-max {spread(check_time)})')


if __name__ == '__main__':
    main()
