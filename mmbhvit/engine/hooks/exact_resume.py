# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Make ``--resume`` continue exactly where an interrupted run stopped.

A Runner checkpoint holds the model, the optimizer, the parameter schedulers
and the message hub, but no random state. After ``--resume`` the dropout
masks, drop-path draws and data augmentation of the next iterations therefore
differ from the ones an uninterrupted run would have drawn, and the run ends
with different weights. :class:`ExactResumeHook` adds the missing state to
every checkpoint and puts it back on resume.

What a checkpoint holds (top-level key :data:`CHECKPOINT_KEY`), only plain
Python types and tensors, so that the file still loads with
``torch.load(weights_only=True)``:

* ``version`` (:data:`FORMAT_VERSION`) and ``world_size``;
* ``rng``: one entry per rank (gathered to rank 0 in distributed runs) with
  the state of Python's ``random``, NumPy's global ``RandomState`` (as
  lists and ints), the torch CPU generator (a ``uint8`` tensor) and, when
  CUDA has been initialised, the generator of every CUDA device (else
  ``None``). These feed the main process: dropout, drop path, augmentations
  of a dataloader with ``num_workers=0``, batch augmentations.
* ``data``: the training dataloader's sampler type and seed, its number of
  batches per epoch and its workers, to reposition the data and to say why
  a continuation cannot be exact when they changed.

When the states are put back matters as much as what they are: between
loading the checkpoint and the first new iteration mmengine runs hooks and,
in ``IterBasedTrainLoop``, replays the data of the iterations already done
(loading them, so the sampler and dataloader workers advance as they did).
The hook therefore restores the states right before the first batch of the
resumed run is fetched, which is when the uninterrupted run fetched it:

* ``IterBasedTrainLoop``: after mmengine's replay of ``iter`` batches;
* ``EpochBasedTrainLoop`` resumed at an epoch end: at the start of the next
  epoch, before the sampler is iterated;
* ``EpochBasedTrainLoop`` resumed in the middle of an epoch (a checkpoint
  written with ``CheckpointHook(by_epoch=False)``): mmengine would start the
  epoch again from its first batch; the hook instead replays the batches
  the epoch had already trained (loaded, then dropped) and continues with
  the next one, so the epoch has its usual length. (Only the batch index
  that hooks see, e.g. in the log, restarts at 0 in that epoch.)

Validation runs between a checkpoint and the next training iteration in an
uninterrupted run, but not in the resumed one; the hook keeps it out of the
training random stream by saving the states before validation and putting
them back after it.

Dataloader workers need nothing from the checkpoint when ``randomness.seed``
is set: mmengine's ``worker_init_fn`` seeds each worker from the seed, the
rank and the worker id only, so workers created at the same point of the
data stream draw the same numbers. That holds for ``IterBasedTrainLoop``
(one iterator; its replay passes every batch through the workers again) and
for ``EpochBasedTrainLoop`` with non-persistent workers (new workers each
epoch). It does not hold for ``EpochBasedTrainLoop`` with
``persistent_workers=True`` resumed after the first epoch (the workers of
the uninterrupted run carry their streams over from earlier epochs), nor
when the resumed run has another seed (``randomness.seed=None`` draws a new
one): the hook then warns that the continuation is not exact.

A checkpoint written without these states (by a config without this hook,
or an older mmbhvit) is resumed with a warning that the continuation is not
exact.
"""
import logging
import random
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

#: Top-level checkpoint key written by :class:`ExactResumeHook`.
CHECKPOINT_KEY = 'exact_resume'
#: Layout version of what is stored under :data:`CHECKPOINT_KEY`.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Random states as plain data
# ---------------------------------------------------------------------------
def get_random_state() -> Dict[str, Any]:
    """The random states of this process as plain types and tensors.

    Returns:
        dict: ``python`` (``random.getstate()``: version, a tuple of 625 ints,
        the cached Gaussian or ``None``), ``numpy`` (NumPy's global
        ``RandomState``: ``bit_generator``, ``key`` as a list of 624 ints,
        ``pos``, ``has_gauss``, ``gauss``), ``torch`` (the CPU generator, a
        ``uint8`` tensor) and ``cuda`` (one ``uint8`` tensor per CUDA device,
        or ``None`` when CUDA is absent or was never initialised: its
        generators then still hold their seed).
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return dict(
        python=(int(version), tuple(int(v) for v in internal),
                None if gauss_next is None else float(gauss_next)),
        numpy=dict(
            bit_generator=str(name),
            key=[int(v) for v in key],
            pos=int(pos),
            has_gauss=int(has_gauss),
            gauss=float(gauss)),
        torch=torch.get_rng_state(),
        cuda=cuda)


def set_random_state(state: Dict[str, Any]) -> List[str]:
    """Put back states returned by :func:`get_random_state`.

    Python, NumPy and the torch CPU generator are always restored. CUDA
    states are restored on as many devices as both the state and this
    machine have.

    Returns:
        list[str]: What could not be restored (CUDA states without CUDA
        here, or another number of devices); empty when everything was.
    """
    version, internal, gauss_next = state['python']
    random.setstate((int(version), tuple(int(v) for v in internal),
                     None if gauss_next is None else float(gauss_next)))
    np_state = state['numpy']
    np.random.set_state(
        (np_state['bit_generator'],
         np.asarray(np_state['key'], dtype=np.uint32), int(np_state['pos']),
         int(np_state['has_gauss']), float(np_state['gauss'])))
    # mmengine's resume maps the checkpoint to the training device; the
    # generators take CPU byte tensors.
    torch.set_rng_state(state['torch'].cpu())
    problems = []
    cuda = state.get('cuda')
    if cuda:
        if not torch.cuda.is_available():
            problems.append(f'the checkpoint holds the random states of '
                            f'{len(cuda)} CUDA device(s) and CUDA is not '
                            'available here')
        else:
            count = torch.cuda.device_count()
            for device in range(min(count, len(cuda))):
                torch.cuda.set_rng_state(cuda[device].cpu(), device)
            if count != len(cuda):
                problems.append(f'the checkpoint holds the random states of '
                                f'{len(cuda)} CUDA device(s), this machine '
                                f'has {count}')
    return problems


# ---------------------------------------------------------------------------
# Stand-ins that reposition the training data on resume
# ---------------------------------------------------------------------------
class _RestoreAfterReplay:
    """Stands for ``IterBasedTrainLoop.dataloader_iterator`` on resume.

    mmengine's loop fetches (and drops) ``replay`` batches to reach the
    resumed iteration, then fetches the batch of that iteration. This
    iterator passes every call on and calls ``on_ready`` just before the
    first one after the replay, then puts the real iterator back.
    """

    def __init__(self, loop, replay: int, on_ready: Callable[[], None]):
        self._loop = loop
        self._inner = loop.dataloader_iterator
        self._remaining = replay
        self._on_ready = on_ready

    def __iter__(self):
        return self

    def __next__(self):
        if self._remaining == 0:
            self._on_ready()
            self._loop.dataloader_iterator = self._inner
        else:
            self._remaining -= 1
        return next(self._inner)


class _ResumedEpochLoader:
    """Stands for the train dataloader during a resumed, unfinished epoch.

    Iterating it iterates the real dataloader, drops the first ``skip``
    batches (loaded as usual, so the sampler and the dataloader workers
    advance as they did in the interrupted run), calls ``on_ready``, then
    yields the remaining batches. Everything else (``len``, ``sampler``,
    ``dataset``, ...) is the real dataloader's.
    """

    def __init__(self, loader, skip: int, on_ready: Callable[[], None]):
        self._loader = loader
        self._skip = skip
        self._on_ready = on_ready

    def __iter__(self):
        batches = iter(self._loader)
        for _ in range(self._skip):
            next(batches)
        self._on_ready()
        yield from batches

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _data_info(runner) -> Dict[str, Any]:
    """The training dataloader facts a resume depends on."""
    loader = runner.train_dataloader
    sampler = getattr(loader, 'sampler', None)
    batch_sampler = getattr(loader, 'batch_sampler', None)
    if sampler is None or not hasattr(sampler, 'seed'):
        sampler = getattr(batch_sampler, 'sampler', sampler)
    seed = getattr(sampler, 'seed', None)
    try:
        batches = len(loader)
    except TypeError:  # an iterable dataset without __len__
        batches = None
    return dict(
        sampler=type(sampler).__name__,
        sampler_seed=None if seed is None else int(seed),
        batches_per_epoch=batches,
        num_workers=int(getattr(loader, 'num_workers', 0)),
        persistent_workers=bool(getattr(loader, 'persistent_workers', False)),
        seed=None if runner.seed is None else int(runner.seed))


# ---------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------
@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Store every random state in checkpoints; restore it on resume.

    With this hook, a run resumed (``--resume``) from one of its checkpoints
    ends with the same weights, bit for bit, as the run that was not
    interrupted, given a fixed ``randomness.seed`` and a deterministic
    device (the CPU). See the module documentation for what is stored, when
    it is restored and the cases that cannot be exact (each is warned
    about). In the shipped configs through ``custom_hooks`` of
    ``configs/_base_/default_runtime*.py``.

    Loading a checkpoint for fine-tuning (``load_from`` without resume)
    restores nothing: the states are only put back when the training loop
    continues at the checkpoint's iteration.
    """

    # Before the other hooks: the states are saved before, and put back
    # after, whatever validation hooks do; they are restored at an epoch
    # start before any other hook of that epoch runs.
    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._gathered: Optional[List[dict]] = None  # all ranks, distributed
        self._val_states: Optional[List[dict]] = None  # before validation
        self._loaded: Optional[dict] = None  # what the last load found

    # -- saving -----------------------------------------------------------
    def _all_ranks(self) -> List[dict]:
        """This process's states, or every rank's (a collective call)."""
        state = get_random_state()
        if get_world_size() == 1:
            return [state]
        return all_gather_object(state)

    @staticmethod
    def _checkpoint_due(runner, by_epoch: bool) -> bool:
        """Whether a ``CheckpointHook`` saves now.

        This repeats ``CheckpointHook``'s own rule (interval, save_begin,
        save_last) on purpose: only rank 0 writes the checkpoint, so the
        other ranks must send their states *before* it saves, at the same
        iterations. A custom checkpoint hook with another rule leaves the
        other ranks' states out; resuming then warns that it is not exact.
        """
        for hook in runner.hooks:
            if not isinstance(hook, CheckpointHook) or (
                    hook.by_epoch != by_epoch):
                continue
            if by_epoch:
                last = hook.save_last and hook.is_last_train_epoch(runner)
                due = last or hook.every_n_epochs(runner, hook.interval,
                                                  hook.save_begin)
            else:
                last = hook.save_last and hook.is_last_train_iter(runner)
                due = last or hook.every_n_train_iters(runner, hook.interval,
                                                       hook.save_begin)
            if due:
                return True
        return False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        # Distributed: the checkpoint is written by rank 0 alone, so every
        # rank's states are gathered first, on all ranks, when it is due.
        self._gathered = None
        if get_world_size() > 1 and self._checkpoint_due(runner, False):
            self._gathered = self._all_ranks()

    def after_train_epoch(self, runner) -> None:
        loop = runner.train_loop
        if isinstance(getattr(loop, 'dataloader', None), _ResumedEpochLoader):
            # the resumed epoch ended: the real dataloader again
            loop.dataloader = loop.dataloader._loader
        self._gathered = None
        if get_world_size() > 1 and self._checkpoint_due(runner, True):
            self._gathered = self._all_ranks()

    def before_val(self, runner) -> None:
        self._val_states = self._all_ranks()

    def after_val(self, runner) -> None:
        if self._val_states is not None:
            set_random_state(self._val_states[get_rank()])
            self._val_states = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Add :data:`CHECKPOINT_KEY` to the checkpoint (rank 0)."""
        if self._val_states is not None:  # a best checkpoint, mid-validation
            states = self._val_states
        elif self._gathered is not None:
            states = self._gathered
        else:
            states = [get_random_state()]
        checkpoint[CHECKPOINT_KEY] = dict(
            version=FORMAT_VERSION,
            world_size=get_world_size(),
            rng=states,
            data=_data_info(runner))

    # -- resuming ---------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the stored states; they are applied if training resumes."""
        meta = checkpoint.get('meta') or {}
        self._loaded = dict(
            iter=meta.get('iter'),
            epoch=meta.get('epoch'),
            state=checkpoint.get(CHECKPOINT_KEY))

    def _warn(self, reasons: List[str]) -> None:
        print_log(
            'ExactResumeHook: the resumed run does NOT continue exactly as '
            'the uninterrupted run would have: ' + '; '.join(reasons) + '.',
            logger='current',
            level=logging.WARNING)

    def before_train_epoch(self, runner) -> None:
        loaded, self._loaded = self._loaded, None
        if (loaded is None or loaded['iter'] is None
                or (runner.iter, runner.epoch) !=
                (loaded['iter'], loaded['epoch'])):
            return  # not a resume (fresh start, or load_from)
        state = loaded['state']
        reasons = []
        if state is None:
            reasons.append(
                'the checkpoint holds no random states (it was written '
                'without ExactResumeHook, e.g. by an older mmbhvit), so '
                'dropout, drop path and data augmentation draw other '
                'numbers from here on')
        elif state.get('version') != FORMAT_VERSION:
            reasons.append(f'its random states have format version '
                           f'{state.get("version")!r}, this mmbhvit reads '
                           f'{FORMAT_VERSION}')
            state = None
        rng = None
        if state is not None:
            rank, stored = get_rank(), state['rng']
            if get_world_size() != state['world_size']:
                reasons.append(f'it was written by {state["world_size"]} '
                               f'process(es), this run has '
                               f'{get_world_size()}')
            if rank < len(stored):
                rng = stored[rank]
            else:
                reasons.append(f'it holds no random states for rank {rank}')
            reasons += self._data_changes(runner, state['data'])

        def restore():
            problems = set_random_state(rng) if rng is not None else []
            if problems or reasons:
                self._warn(reasons + problems)
            else:
                print_log(
                    'ExactResumeHook: random states of the interrupted run '
                    'restored (Python, NumPy, torch' +
                    (', CUDA' if rng.get('cuda') else '') +
                    f') for iteration {runner.iter + 1}.',
                    logger='current')

        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop):
            # restore after mmengine's replay of the first `iter` batches
            loop.dataloader_iterator = _RestoreAfterReplay(
                loop, runner.iter, restore)
        elif isinstance(loop, EpochBasedTrainLoop):
            done = runner.iter - runner.epoch * len(loop.dataloader)
            if done == 0:
                restore()
            elif 0 < done <= len(loop.dataloader):
                # (done == len: written by iteration after the last batch,
                # before the epoch's end; the epoch then only ends)
                loop.dataloader = _ResumedEpochLoader(loop.dataloader, done,
                                                      restore)
                print_log(
                    f'ExactResumeHook: the checkpoint was written after '
                    f'{done} of the {len(loop.dataloader)} batches of epoch '
                    f'{runner.epoch + 1}; replaying them (loaded, not '
                    'trained) to continue with the next one.',
                    logger='current')
            else:
                reasons.append(
                    f'iteration {runner.iter} does not fall into epoch '
                    f'{runner.epoch + 1} of {len(loop.dataloader)} batches')
                restore()
        else:
            reasons.append(f'the train loop {type(loop).__name__} is '
                           'neither iteration- nor epoch-based, its data '
                           'position is not restored')
            restore()

    @staticmethod
    def _data_changes(runner, saved: Dict[str, Any]) -> List[str]:
        """Reasons why the data cannot continue as they would have."""
        now = _data_info(runner)
        reasons = []
        if saved['sampler_seed'] != now['sampler_seed'] or (
                saved['seed'] != now['seed']):
            reasons.append(
                f'the data order and the dataloader workers follow seed '
                f'{now["seed"]} (sampler seed {now["sampler_seed"]}) in this '
                f'run and {saved["seed"]} (sampler seed '
                f'{saved["sampler_seed"]}) in the checkpoint; resume with '
                f'--cfg-options randomness.seed={saved["seed"]}')
        if saved['sampler'] != now['sampler']:
            reasons.append(f'the sampler was {saved["sampler"]} and is '
                           f'{now["sampler"]} now')
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            if saved['batches_per_epoch'] != now['batches_per_epoch']:
                reasons.append(
                    f'an epoch had {saved["batches_per_epoch"]} batches and '
                    f'has {now["batches_per_epoch"]} now')
            if (now['num_workers'] > 0 and now['persistent_workers']
                    and runner.epoch > 0):
                reasons.append(
                    'the persistent dataloader workers of an epoch-based run '
                    'carry their random streams across epochs and restart '
                    'from the seed here (use persistent_workers=False for '
                    'exact resume)')
        return reasons
