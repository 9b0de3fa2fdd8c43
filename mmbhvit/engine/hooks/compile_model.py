# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""``torch.compile`` a part of the model in place during training."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class CompileModelHook(Hook):
    """Compile ``model.<target>`` with :meth:`torch.nn.Module.compile` after
    the first training iteration (what ``tools/train.py --compile`` adds).

    Why not mmengine's ``compile=True``: it compiles the whole
    ``train_step``, optimizer update included, which dynamo stops on with
    mmengine 0.10.7 and torch 2.14; and mmseg/mmpretrain ``loss`` methods
    take lists of data samples, one graph break each. The backbone is where
    the time goes, takes a tensor and returns tensors, and compiles as one
    graph (``tests/test_train_speed.py``). ``Module.compile`` compiles in
    place: parameter names, checkpoints and ``load_from``/``resume`` stay
    those of the eager model. Validation in eval mode compiles once more.

    The first iteration of a run (or of a resumed run) stays eager and the
    module is compiled after it: it holds the data-dependent initialisations
    (LSQ step sizes read a flag on the host), which would otherwise be a
    graph break in the first compiled graph and a second compilation once
    they are done.

    Args:
        target (str): dotted path of the submodule to compile; ``''`` is
            the whole model. Default: ``'backbone'``.
        mode (str, optional): ``torch.compile``'s ``mode``.
        dynamic (bool, optional): ``torch.compile``'s ``dynamic``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, target: str = 'backbone', mode: Optional[str] = None,
                 dynamic: Optional[bool] = None):
        self.target = target
        self.kwargs = dict(mode=mode, dynamic=dynamic)
        self._compiled = False

    def before_train(self, runner) -> None:
        self._module(runner)  # a wrong target stops before any iteration
        self._compiled = False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._compiled:
            return
        module = self._module(runner)
        module.compile(**self.kwargs)
        self._compiled = True
        print_log(f'torch.compile: {self.target or "the model"} '
                  f'({type(module).__name__}) compiled in place after the '
                  'first (eager) iteration; the next one includes the '
                  'compilation', logger='current')

    def _module(self, runner):
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        try:
            module = model.get_submodule(self.target)
        except AttributeError as err:
            raise ValueError(
                f'CompileModelHook: the model ({type(model).__name__}) has '
                f'no submodule {self.target!r} to compile') from err
        return module
