# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Stop training at the first NaN / inf, before it reaches the weights."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from torch import Tensor, nn

from ...models.binary import LSQAttentionQuantizer
from ...models.finite import NonFiniteError, all_finite, describe_nonfinite

# Modules whose training forward writes parameters (data-driven
# initialisation on their first step) while ``pending(module)`` holds: their
# state is saved too while it does, and restored with ``load_state_dict``.
DATA_INIT_MODULES = {
    LSQAttentionQuantizer: lambda m: not bool(m.initialized.any()),
}
# Buffers that tell a module that its training forward updates its buffers
# (BatchNorm / SyncBN / InstanceNorm with running statistics).
RUNNING_STAT_BUFFERS = ('running_mean', 'running_var')


def _file_names(data_samples) -> Optional[List[Optional[str]]]:
    """``img_path`` of each data sample, if they have one."""
    if not isinstance(data_samples, (list, tuple)):
        return None
    names = []
    for sample in data_samples:
        meta = getattr(sample, 'metainfo', None) or {}
        names.append(meta.get('img_path'))
    return names if any(names) else None


def _image_batches(inputs, names) -> List[Tuple[str, Tensor, list]]:
    """``(label, batch, file names)`` for the tensors of a model input: a
    batch tensor, a list / tuple of images, or a dict of batches."""
    if isinstance(inputs, Tensor):
        return [('inputs', inputs, names)]
    if isinstance(inputs, (list, tuple)):
        return [(f'inputs[{i}]', t[None],
                 [names[i]] if names and i < len(names) else None)
                for i, t in enumerate(inputs) if isinstance(t, Tensor)]
    if isinstance(inputs, dict):
        return [(f'inputs[{k!r}]', t, names) for k, t in inputs.items()
                if isinstance(t, Tensor)]
    return []


def _loss_terms(losses) -> Dict[str, List[Tensor]]:
    """The terms mmengine's ``parse_losses`` sums (keys containing
    ``'loss'``)."""
    if not isinstance(losses, dict):
        return {}
    terms = {}
    for name, value in losses.items():
        if 'loss' not in name:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        values = [v for v in values if isinstance(v, Tensor)]
        if values:
            terms[name] = values
    return terms


@HOOKS.register_module()
class NonFiniteCheckHook(Hook):
    """Stop training with an error at the first non-finite input or loss
    (optionally gradient), **before any parameter or BatchNorm buffer
    changes**.

    One NaN pixel (a corrupt float image, a std of 0 in the data
    preprocessor) or one overflowing loss term otherwise turns every
    BatchNorm running statistic, then every weight, into NaN, and training
    goes on silently. In every training step (``mode='loss'`` forward of
    ``runner.model``, also a DDP wrapper) the hook

    1. checks the preprocessed input batch before the forward and names the
       images (batch index and ``img_path``);
    2. saves the buffers of the modules with running statistics
       (BatchNorm, SyncBN: mean, variance, counter; a few hundred small
       tensors), plus the state of the modules that initialise parameters
       from their first batch (``DATA_INIT_MODULES``: the LSQ attention
       quantizers) while they have not;
    3. checks each loss term (the keys with ``'loss'``, as summed by
       ``parse_losses``) after the forward, before ``backward``: if one is
       NaN/inf, the saved buffers are put back (the forward has already
       updated the running statistics) and the error names the terms;
    4. with ``check_grads=True``, checks the gradients in a pre-step hook
       of the optimizer, i.e. only when a step is really about to happen: if
       one is NaN/inf, the buffers are put back and the error names the
       parameters. Off by default: it reads every gradient once per step,
       about 1-2 % of a CPU step of the demo config. Without it, a
       non-finite gradient of a finite loss (rare: an overflow inside the
       backward) is caught one step later as a non-finite loss, whose error
       then says that parameters already hold NaN/inf.

    Every error is a :class:`~mmbhvit.models.finite.NonFiniteError` naming
    the training iteration as in the log (1-based; with an epoch-based loop
    also the epoch and the batch of the epoch). Under torch.distributed the
    flags are summed over the ranks, so every rank stops at the same place
    and names the ranks that saw the value (a rank never waits in
    ``backward`` for one that stopped).

    **Mixed precision** (``AmpOptimWrapper``): inf/NaN gradients are normal
    there: the loss scaler finds them, skips ``optimizer.step()`` and lowers
    the scale. The gradient check runs inside ``optimizer.step()``, so it
    only sees steps the scaler lets through (unscaled, finite gradients);
    optimizers that handle the scaler themselves (``found_inf`` /
    ``grad_scaler`` passed to ``step``, e.g. fused AdamW) are not checked.
    The input and loss checks stay on: the scaler acts on the backward
    only, and a non-finite loss means the forward overflowed, which also
    poisons the BatchNorm statistics.

    Cost (default checks): one reduction over the input batch, one over
    the loss terms, a copy of the running statistics, and a host sync
    before the backward (on an accelerator it waits for the forward);
    ``tools/analysis_tools/benchmark_finite_check.py`` measures it.

    Args:
        check_inputs (bool): check the input batch. Default True.
        check_loss (bool): check the loss terms. Default True.
        check_grads (bool): check the gradients before each optimizer step.
            Default False (see 4. above).
    """

    priority = 'NORMAL'

    def __init__(self,
                 check_inputs: bool = True,
                 check_loss: bool = True,
                 check_grads: bool = False):
        self.check_inputs = check_inputs
        self.check_loss = check_loss
        self.check_grads = check_grads
        self._handles: list = []
        self._model: Optional[nn.Module] = None
        self._where = 'training (iteration unknown)'
        self._saved_buffers: List[Tuple[Tensor, Tensor]] = []
        self._saved_modules: List[Tuple[nn.Module, dict]] = []
        self._data_init_modules: List[nn.Module] = []
        self._stat_modules: List[nn.Module] = []
        self._epoch_based = False

    # ------------------------------------------------------------------
    # mmengine hook points
    # ------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self.attach(runner.model, runner.optim_wrapper)
        self._epoch_based = isinstance(
            getattr(runner, 'train_loop', None), EpochBasedTrainLoop)

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        where = f'training iteration {runner.iter + 1}'
        if self._epoch_based:
            where += (f' (epoch {runner.epoch + 1}, batch {batch_idx + 1} '
                      'of the epoch)')
        self._where = where

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        self._saved_buffers, self._saved_modules = [], []

    def after_train(self, runner) -> None:
        self.detach()

    # ------------------------------------------------------------------
    # torch hooks
    # ------------------------------------------------------------------
    def attach(self, model: nn.Module, optim_wrapper=None) -> None:
        """Install the checks on ``model`` (the module whose ``train_step``
        runs, e.g. a DDP wrapper) and on the optimizers of
        ``optim_wrapper`` (an ``OptimWrapper`` or ``OptimWrapperDict``)."""
        self.detach()
        self._model = model
        self._data_init_modules = [
            m for m in model.modules() if type(m) in DATA_INIT_MODULES
        ]
        self._stat_modules = [
            m for m in model.modules() if any(
                name in RUNNING_STAT_BUFFERS
                for name, _ in m.named_buffers(recurse=False))
        ]
        self._handles.append(
            model.register_forward_pre_hook(self._before_forward,
                                            with_kwargs=True))
        self._handles.append(
            model.register_forward_hook(self._after_forward,
                                        with_kwargs=True))
        if self.check_grads and optim_wrapper is not None:
            wrappers = getattr(optim_wrapper, 'optim_wrappers', None)
            wrappers = (wrappers.values()
                        if isinstance(wrappers, dict) else [optim_wrapper])
            for wrapper in wrappers:
                self._handles.append(
                    wrapper.optimizer.register_step_pre_hook(
                        self._before_step))

    def detach(self) -> None:
        """Remove the torch hooks (after training)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._saved_buffers, self._saved_modules = [], []

    @staticmethod
    def _is_train_forward(module: nn.Module, args, kwargs) -> bool:
        # BaseModel.train_step -> _run_forward -> model(..., mode='loss')
        return module.training and kwargs.get('mode') == 'loss'

    def _before_forward(self, module, args, kwargs):
        if not self._is_train_forward(module, args, kwargs):
            return None
        if self.check_inputs:
            inputs = kwargs.get('inputs', args[0] if args else None)
            samples = kwargs.get('data_samples',
                                 args[1] if len(args) > 1 else None)
            batches = _image_batches(inputs, _file_names(samples))
            bad = [b for b in batches if not all_finite(b[1])]
            ranks = self._ranks_with(
                bool(bad), batches[0][1].device if batches else None)
            if ranks is not None:
                if bad:
                    detail = '; '.join(
                        f'{label} {tuple(t.shape)}: '
                        f'{describe_nonfinite(t, names)}'
                        for label, t, names in bad)
                else:
                    detail = 'see the error of that rank'
                raise NonFiniteError(
                    f'Non-finite input at {self._where}{ranks}: {detail}. '
                    'Training stopped before the forward; no parameter or '
                    'BatchNorm statistic was updated in this iteration. '
                    'Check these images and the data pipeline (e.g. a std '
                    'of 0 in the data preprocessor).')
        if self.check_loss or self.check_grads:
            self._save_state()
        return None

    def _after_forward(self, module, args, kwargs, output):
        if not self.check_loss or not self._is_train_forward(
                module, args, kwargs):
            return None
        terms = _loss_terms(output)
        if not terms:
            return None
        sums = torch.stack([
            sum(v.detach().float().sum() for v in values)
            for values in terms.values()
        ])
        finite = torch.isfinite(sums)
        ranks = self._ranks_with(not bool(finite.all()), sums.device)
        if ranks is None:
            return None
        self.restore()
        detail = ', '.join(f'{name} = {float(value)}' for name, value, ok in
                           zip(terms, sums, finite.tolist()) if not ok)
        detail = detail or 'see the error of that rank'
        broken = [n for n, p in module.named_parameters() if not all_finite(p)]
        if broken:
            detail += (f'; {len(broken)} parameter(s) already hold NaN/inf '
                       f'(e.g. {broken[0]}): an earlier optimizer step used a '
                       'non-finite gradient (check_grads=True stops there)')
        if self.check_inputs:
            detail += ' (the input batch was finite)'
        raise NonFiniteError(
            f'Non-finite loss at {self._where}{ranks}: {detail}. Training '
            'stopped before the backward; the BatchNorm '
            'statistics of this forward were restored, no parameter was '
            'updated. Lower the learning rate, add gradient clipping, or '
            'check the loss configuration; resume from the last checkpoint.')

    def _before_step(self, optimizer, args, kwargs):
        if {'found_inf', 'grad_scaler', 'grad_scale'} & set(kwargs):
            return None  # the optimizer applies the AMP loss scaler itself
        grads = [p.grad for group in optimizer.param_groups
                 for p in group['params'] if p.grad is not None]
        if not grads:
            return None
        # one fused pass; an overflow of finite values is sorted out exactly
        norm = torch.nn.utils.get_total_norm(grads, 2.)
        finite = bool(torch.isfinite(norm)) or all(all_finite(g)
                                                   for g in grads)
        ranks = self._ranks_with(not finite, norm.device)
        if ranks is None:
            return None
        self.restore()
        detail = ('see the error of that rank'
                  if finite else self._describe_grads(optimizer))
        raise NonFiniteError(
            f'Non-finite gradient at {self._where}{ranks} (finite input and '
            f'loss): {detail}. Training stopped before the optimizer step; '
            'the BatchNorm statistics of this forward were restored, no '
            'parameter was updated.')

    # ------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------
    def _save_state(self) -> None:
        with torch.no_grad():
            self._saved_buffers = [(b, b.clone())
                                   for m in self._stat_modules
                                   for b in m.buffers(recurse=False)]
            self._saved_modules = [
                (m, {k: v.clone() for k, v in m.state_dict().items()})
                for m in self._data_init_modules
                if DATA_INIT_MODULES[type(m)](m)
            ]

    def restore(self) -> None:
        """Put back the buffers (and data-initialised modules) saved before
        the last training forward."""
        with torch.no_grad():
            for buf, saved in self._saved_buffers:
                buf.copy_(saved)
            for module, state in self._saved_modules:
                module.load_state_dict(state)
        self._saved_buffers, self._saved_modules = [], []

    def _describe_grads(self, optimizer, max_items: int = 5) -> str:
        names = {}
        if self._model is not None:
            names = {id(p): n for n, p in self._model.named_parameters()}
        bad = [p for group in optimizer.param_groups
               for p in group['params']
               if p.grad is not None and not all_finite(p.grad)]
        listed = [names.get(id(p), f'<parameter {tuple(p.shape)}>')
                  for p in bad[:max_items]]
        more = (f' and {len(bad) - max_items} more'
                if len(bad) > max_items else '')
        return (f'{len(bad)} parameter(s) with NaN/inf gradients: '
                f'{", ".join(listed)}{more}')

    @staticmethod
    def _ranks_with(flag: bool, device) -> Optional[str]:
        """None if no rank raised ``flag``; else a suffix for the message
        naming the ranks that did ('' in a single process). Under
        torch.distributed every rank calls it at the same point."""
        world = get_world_size()
        if world <= 1 or not torch_dist.is_initialized():
            return '' if flag else None
        flags = torch.zeros(world, device=device or 'cpu')
        flags[get_rank()] = float(flag)
        torch_dist.all_reduce(flags)
        ranks = flags.nonzero().flatten().tolist()
        if not ranks:
            return None
        return f' on rank(s) {ranks} (this is rank {get_rank()})'
