# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Switch the binary weight regularization on late in training."""
import math
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop


@HOOKS.register_module()
class RegLossSwitchHook(Hook):
    """Turn :math:`L_{re}` on once training reaches ``begin_ratio``.

    BHViT trains without the weight regularization and adds it for the last
    10% of the epochs. The hook drives a model that has
    ``set_reg_loss_enabled(bool)`` and ``reg_loss_enabled`` (e.g.
    :class:`~mmbhvit.models.classifiers.DistillImageClassifier`) and owns
    that state: before training it sets it from the current progress (so a
    resumed run is in the right phase), then switches it on at the switch
    point and logs it.

    Args:
        begin_ratio (float): fraction of the training after which the loss is
            on; 0.9 by default (the last 10%).
        begin (int, optional): absolute switch point (epoch index or
            iteration index, 0-based, in the unit given by ``by_epoch``);
            overrides ``begin_ratio``.
        by_epoch (bool, optional): count epochs (switch at the start of an
            epoch) or iterations. Default: epochs with an epoch-based train
            loop, iterations otherwise.
    """

    priority = 'NORMAL'

    def __init__(self,
                 begin_ratio: float = 0.9,
                 begin: Optional[int] = None,
                 by_epoch: Optional[bool] = None):
        if not 0. <= begin_ratio <= 1.:
            raise ValueError(f'begin_ratio must be in [0, 1], got '
                             f'{begin_ratio}')
        if begin is not None and (not isinstance(begin, int) or begin < 0):
            raise ValueError('begin must be a non-negative int, got '
                             f'{begin!r}')
        self.begin_ratio = begin_ratio
        self.begin = begin
        self.by_epoch = by_epoch
        self.switch_at = None
        self._by_epoch = None

    @staticmethod
    def _model(runner):
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        if not (hasattr(model, 'set_reg_loss_enabled')
                and hasattr(model, 'reg_loss_enabled')):
            raise TypeError(
                f'RegLossSwitchHook needs a model with set_reg_loss_enabled() '
                f'and reg_loss_enabled (e.g. DistillImageClassifier), got '
                f'{type(model).__name__}. Remove the hook from custom_hooks '
                'or use such a model.')
        return model

    def _progress(self, runner) -> int:
        return runner.epoch if self._by_epoch else runner.iter

    def _unit(self) -> str:
        return 'epoch' if self._by_epoch else 'iteration'

    def before_train(self, runner) -> None:
        model = self._model(runner)
        self._by_epoch = (isinstance(runner.train_loop, EpochBasedTrainLoop)
                          if self.by_epoch is None else self.by_epoch)
        total = runner.max_epochs if self._by_epoch else runner.max_iters
        if self.begin is not None:
            self.switch_at = self.begin
        else:
            # ceil: at least begin_ratio of the training runs without L_re
            self.switch_at = math.ceil(self.begin_ratio * total - 1e-9)
        on = self._progress(runner) >= self.switch_at
        model.set_reg_loss_enabled(on)
        print_log(
            f'RegLossSwitchHook: the weight regularization (L_re) is '
            f'{"ON" if on else "off"} now and switches on at {self._unit()} '
            f'{self.switch_at} (of {total}, 0-based).', logger='current')

    def _maybe_switch(self, runner) -> None:
        model = self._model(runner)
        if model.reg_loss_enabled or self._progress(runner) < self.switch_at:
            return
        model.set_reg_loss_enabled(True)
        print_log(
            f'RegLossSwitchHook: weight regularization (L_re) switched ON at '
            f'epoch {runner.epoch}, iteration {runner.iter}.',
            logger='current')

    def before_train_epoch(self, runner) -> None:
        if self._by_epoch:
            self._maybe_switch(runner)

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        if not self._by_epoch:
            self._maybe_switch(runner)
