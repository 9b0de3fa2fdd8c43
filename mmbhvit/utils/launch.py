# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Config adjustments shared by ``tools/train.py`` and ``tools/test.py``.

They make the mmseg configs (written for 8 GPUs with SyncBN and NCCL) run
on machines without CUDA as well:

* multi-process CPU runs use the ``gloo`` backend;
* ``SyncBN`` becomes ``BN`` on the CPU, because ``torch.nn.SyncBatchNorm``
  only runs on GPU/XPU tensors (it raises "SyncBatchNorm expected input
  tensor to be on GPU" once a process group exists). Parameters still stay
  identical on every rank (DDP averages the gradients); only the BN batch
  statistics are then per process;
* DDP is built without ``device_ids`` (a CPU module refuses them);
* ``--amp`` (mmengine's ``AmpOptimWrapper``, CUDA/NPU/MLU only) falls back
  to full precision with a warning instead of an assertion error.
"""
import contextlib
import logging
import os
import os.path as osp
from typing import Any, Iterator

from mmengine.logging import print_log

from .malloc import keep_freed_memory


def add_runner_args(parser) -> None:
    """The options ``tools/train.py`` and ``tools/test.py`` share, as in
    mmseg: ``--cfg-options``, ``--launcher`` and ``--local-rank``."""
    from mmengine.config import DictAction
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or
    # --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser, argv=None):
    """``parser.parse_args(argv)``, exporting ``LOCAL_RANK`` when the
    launcher passed it as an option."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def config_from_args(args):
    """The config ``tools/train.py`` and ``tools/test.py`` start from, as in
    mmseg: ``args.config`` with ``--launcher`` and ``--cfg-options``
    applied, and the work directory from ``--work-dir``, else the config's,
    else ``./work_dirs/<config name>``."""
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def accelerator_available() -> bool:
    """Whether mmengine would train on an accelerator (CUDA, NPU, MLU)."""
    from mmengine.device import (is_cuda_available, is_mlu_available,
                                 is_npu_available)
    return is_cuda_available() or is_npu_available() or is_mlu_available()


def replace_norm_type(cfg: Any, old: str = 'SyncBN', new: str = 'BN') -> int:
    """Replace ``type=old`` by ``type=new`` in every norm config inside
    ``cfg`` (recursively, in place); return how many were replaced."""
    count = 0
    if isinstance(cfg, dict):
        if cfg.get('type') == old:
            cfg['type'] = new
            count += 1
        for value in cfg.values():
            count += replace_norm_type(value, old, new)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            count += replace_norm_type(value, old, new)
    return count


def _warn(msg: str) -> None:
    print_log(msg, logger='current', level=logging.WARNING)


def setup_amp(cfg, amp: bool) -> None:
    """Turn on mmengine AMP for ``--amp`` (as mmseg's tools do), or warn
    and stay in float32 when there is no accelerator."""
    if not amp:
        return
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper == 'AmpOptimWrapper':
        _warn('AMP training is already enabled in your config.')
        return
    if not accelerator_available():
        _warn('--amp ignored: mmengine mixed precision (AmpOptimWrapper) '
              'needs CUDA, NPU or MLU and none is available; training in '
              'float32 on the CPU.')
        return
    if wrapper != 'OptimWrapper':
        raise ValueError('--amp is only supported when the optimizer wrapper '
                         f'type is OptimWrapper, got {wrapper}.')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def init_cpu_process_group(launcher: str, dist_cfg: dict) -> None:
    """Start the gloo process group of a CPU run ourselves.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` first, which
    fails without a GPU; the Runner skips it when a group already exists.
    """
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if launcher != 'pytorch':
        raise RuntimeError(
            f'--launcher {launcher} needs a GPU with mmengine 0.10; on the '
            'CPU use --launcher pytorch with torchrun '
            '(tools/dist_train.sh / tools/dist_test.sh).')
    kwargs = {k: v for k, v in dict(dist_cfg).items() if k != 'backend'}
    kwargs.pop('init_backend', None)
    dist.init_process_group(backend='gloo', **kwargs)


def close_process_group(wait: bool = True) -> None:
    """Shut the default process group down, if one exists.

    A process that exits with its gloo group still alive can be aborted
    while the interpreter finalises ("terminate called without an active
    exception", SIGABRT: a gloo thread still joinable at teardown), which
    turns a finished ``dist_test.sh`` into a failure. ``wait`` first waits
    for every rank at a barrier (after a normal finish); a rank that is
    leaving on an error does not wait for ranks that may never arrive.
    """
    import torch.distributed as dist
    if not _group_exists():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def _group_exists() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group_closed() -> Iterator[None]:
    """Run the body of ``tools/train.py`` / ``tools/test.py`` and close the
    process group it started when it ends, by returning or by raising
    (``sys.exit`` included). A group that existed before is left alone:
    it belongs to the caller."""
    started_here = not _group_exists()
    finished = False
    try:
        yield
        finished = True
    finally:
        if started_here:
            close_process_group(wait=finished)


def setup_cpu_runtime(cfg) -> None:
    """Adapt ``cfg`` in place when no accelerator is available (and let
    glibc keep freed memory: :func:`~mmbhvit.utils.malloc.keep_freed_memory`,
    activations are then not faulted in anew every step)."""
    if accelerator_available():
        return
    keep_freed_memory()
    cfg.setdefault('env_cfg', {})
    cfg.env_cfg.setdefault('dist_cfg', {})
    cfg.env_cfg.cudnn_benchmark = False
    if cfg.launcher != 'none':
        if cfg.env_cfg.dist_cfg.get('backend', 'nccl') != 'gloo':
            cfg.env_cfg.dist_cfg.backend = 'gloo'
        init_cpu_process_group(cfg.launcher, cfg.env_cfg.dist_cfg)
        replaced = replace_norm_type(cfg.model)
        if replaced:
            _warn(f'No GPU: {replaced} SyncBN config(s) replaced by BN '
                  '(torch SyncBatchNorm cannot run on CPU tensors); batch '
                  'statistics are per process.')
        if cfg.get('sync_bn') is not None:
            _warn(f'No GPU: ignoring sync_bn={cfg.sync_bn!r}.')
            cfg.sync_bn = None
        wrapper = dict(cfg.get('model_wrapper_cfg') or {})
        wrapper.setdefault('type', 'MMDistributedDataParallel')
        # a CPU module must not be given device_ids
        wrapper['device_ids'] = None
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters',
                           cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper
