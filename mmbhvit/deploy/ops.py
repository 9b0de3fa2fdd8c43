# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""What the packed ops share: the C++ extension and the backend choice,
the weight layouts of the kernels, and :class:`PackedOp`.

Every op (one per module kind, in :mod:`mmbhvit.deploy.blocks`) has two
implementations of the same arithmetic:

* ``'cpp'`` – the C++ extension ``mmbhvit._binary_ops``: sign bits packed in
  64-bit words, ±1 products as XNOR (XOR) / AND + popcount, float epilogues
  fused (see ``csrc/``);
* ``'torch'`` – a pure-PyTorch fallback that unpacks the *same* packed words
  with bit operations into ±1 floats and uses float matmul / convolution.
  ±1 products summed in float are exact integers (below 2**24), and the
  epilogue performs the same float operations in the same order as the C++
  code (which is built without FMA contraction), so both give the same
  numbers.

Every op takes and returns channels-last tensors: tokens ``(..., C)`` or
maps ``(N, H, W, C)``.
"""
import warnings
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from ..models.layout import pad_to_multiple, resize_pos_embed
from .packing import bits_to_pm1, pack_bits, unpack_bits

BACKENDS = ('cpp', 'torch')
SHORTCUTS = {'none': 0, 'identity': 1, 'tile': 2, 'mean': 3, 'chunk_mean': 4}
ATTN_MODES = {'lsq': 0, 'gsb': 1}

_EXT = None
_EXT_ERROR: Optional[str] = None
_EXT_TRIED = False
_FALLBACK_WARNED = False

#: How to get the kernels, for every message that says they are missing.
BUILD_HINT = ('they are compiled against the environment\'s torch at install '
              'time, which pip\'s default build isolation hides (as does '
              'MMBHVIT_NO_EXT=1; a torch upgraded since the build breaks '
              'them too): reinstall in this environment, with a C++ '
              'compiler, by `pip install --no-deps --no-build-isolation -e '
              '.` (or `.`); `python -m mmbhvit.deploy.info` shows the '
              'kernel status')


#: The engine's ops that the Python side calls: an extension built from an
#: older source lacks some, and is then refused as a whole (with a message
#: saying to rebuild) instead of failing in the middle of a forward.
ENGINE_OPS = ('proj', 'proj_norm', 'ffn', 'msgdc', 'merge', 'merge_norm',
              'conv', 'attn_scores', 'attn_context', 'attention',
              'attn_tokens', 'attn_untokens', 'shift', 'stem', 'isa',
              'set_isa',
              'available_isas', 'kernel_sets', 'kernel_paths',
              'cpu_clock_hz', 'MSMHAPlan', 'MSGDCPlan', 'FFNPlan', 'ShiftPlan',
              'BlockPlan')


#: Arguments that some of those ops gained later (a build from before then
#: lacks them: its signature, in the op's docstring, does not name them).
ENGINE_OP_ARGS = {op: ('out', ) for op in ('proj', 'proj_norm', 'ffn',
                                            'msgdc', 'shift')}
ENGINE_OP_ARGS['attn_scores'] = ('table', )


def stale_build_reason(ext, names) -> Optional[str]:
    """Why the extension module ``ext`` cannot serve ops ``names`` (a build
    from an older source without some of them, or of their arguments
    :data:`ENGINE_OP_ARGS`), or None."""
    missing = [n for n in names if not hasattr(ext, n)]
    missing += [
        f'{n}(..., {a}=)' for n in names if hasattr(ext, n)
        for a in ENGINE_OP_ARGS.get(n, ())
        if f'{a}:' not in (getattr(ext, n).__doc__ or '')
    ]
    if not missing:
        return None
    return ('mmbhvit._binary_ops was built from an older source, without ' +
            ', '.join(missing) + '; rebuild it')


def load_extension():
    """The compiled kernels, or None (the reason is in
    :func:`extension_error`)."""
    global _EXT, _EXT_ERROR, _EXT_TRIED
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from .. import _binary_ops
        except ImportError as e:  # not built, or built for another torch
            _EXT_ERROR = f'{type(e).__name__}: {e}'
        else:
            _EXT_ERROR = stale_build_reason(_binary_ops, ENGINE_OPS)
            if _EXT_ERROR is None:
                _EXT = _binary_ops
    return _EXT


def extension_available() -> bool:
    return load_extension() is not None


def extension_error() -> Optional[str]:
    load_extension()
    return _EXT_ERROR


def resolve_backend(backend: str = 'auto') -> str:
    """``'auto'`` → ``'cpp'`` when the extension is built, else ``'torch'``
    (with a warning, once per process, saying why and how to build it)."""
    global _FALLBACK_WARNED
    if backend == 'auto':
        if extension_available():
            return 'cpp'
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            warnings.warn(
                'mmbhvit.deploy: the packed-bit C++ kernels '
                f'(mmbhvit._binary_ops) are not available ({extension_error()})'
                f', so the engine runs its slower pure-PyTorch fallback; '
                f'{BUILD_HINT}', RuntimeWarning, stacklevel=2)
        return 'torch'
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got "
                         f'{backend!r}')
    if backend == 'cpp' and not extension_available():
        raise RuntimeError(
            'the packed-bit C++ kernels (mmbhvit._binary_ops) are not '
            f'available ({extension_error()}); {BUILD_HINT}; or use '
            "backend='torch'")
    return backend


def weight_bits(words: Tensor, taps: int, cin: int) -> Tensor:
    """File layout (dense bits per output, ``(out, words(taps * cin))``) →
    bool ``(out, taps, cin)``."""
    return unpack_bits(words, taps * cin).view(words.shape[0], taps, cin)


def kernel_words(words: Tensor, taps: int, cin: int) -> Tensor:
    """File layout → kernel layout ``(taps, words(cin), out_pad)``: each
    tap's input bits start a new word, outputs are zero-padded to a multiple
    of 8 (eight outputs per 512-bit register)."""
    per_tap = pack_bits(weight_bits(words, taps, cin))  # (out, taps, w)
    cout, _, w = per_tap.shape
    cp = (cout + 7) // 8 * 8
    out = per_tap.new_zeros(taps, w, cp)
    out[:, :, :cout] = per_tap.permute(1, 2, 0)
    return out.contiguous()


def lane_path_shape(channels: int, groups: int) -> bool:
    """MSGDC shapes with a lane-parallel kernel (AVX-512 and AVX2): 4 groups
    of 16 or 32 channels (one 16/32-bit lane per output and tap)."""
    return groups == 4 and channels // 4 in (16, 32) and 512 % channels == 0


def lane_words(words: Tensor, cg: int) -> Tensor:
    """MSGDC weights for the lane path: ``(9, nvec, 8)`` words; 512-bit
    register ``v`` of tap ``t`` holds in its ``cg``-bit lane ``j`` the weight
    bits of output ``v * 512 / cg + j``."""
    c = words.shape[0]
    nl = 512 // cg
    nvec = -(-c // nl)
    bits = weight_bits(words, 9, cg).permute(1, 0, 2)  # (9, C, cg)
    pad = bits.new_zeros(9, nvec * nl - c, cg)
    bits = torch.cat([bits, pad], 1).reshape(9, nvec, nl * cg)
    return pack_bits(bits).contiguous()


def pm1_weight(words: Tensor, taps: int, cin: int, dtype) -> Tensor:
    """File layout → ±1 ``(out, taps, cin)`` of ``dtype``."""
    return bits_to_pm1(weight_bits(words, taps, cin), dtype)


def pad_nhwc(x: Tensor, multiple: int) -> Tensor:
    """The model's :func:`~mmbhvit.models.layout.pad_to_multiple` on a
    channels-last ``(N, H, W, C)`` map (zero padding bottom/right; the
    result stays channels-last in memory)."""
    return pad_to_multiple(x.permute(0, 3, 1, 2), multiple).permute(0, 2, 3, 1)


def write_out(y: Tensor, out: Optional[Tensor]) -> Tensor:
    """The fallbacks' side of the kernels' ``out`` argument: ``y`` copied
    into ``out`` (which the kernels write directly, possibly over one of
    their inputs, e.g. the residual), or ``y`` itself without one."""
    if out is None:
        return y
    if out.shape != y.shape or out.dtype != y.dtype:
        raise ValueError(f'out must be {tuple(y.shape)} {y.dtype}, got '
                         f'{tuple(out.shape)} {out.dtype}')
    return out.copy_(y)


def prelu(z: Tensor, slope: Tensor) -> Tensor:
    """PReLU with a per-channel slope, as the kernels compute it."""
    return torch.where(z > 0, z, z * slope)


def group_sums(x: Tensor) -> Tensor:
    """Sums over the last dimension in the kernels' order: a pairwise tree
    ``((x0 + x1) + (x2 + x3)) + ...`` for a power-of-two length, else left
    to right."""
    r = x.shape[-1]
    if r & (r - 1) == 0:
        while x.shape[-1] > 1:
            x = x[..., 0::2] + x[..., 1::2]
        return x[..., 0]
    s = x[..., 0]
    for j in range(1, r):
        s = s + x[..., j]
    return s


class PackedOp:
    """Base of the packed ops (:mod:`mmbhvit.deploy.blocks`): the engine's
    dtype, the resolved backend and the extension (None for ``'torch'``);
    calling an op runs its ``forward``.

    Ops are plain objects, not ``nn.Module`` s: ~150 op calls per forward
    would otherwise pay the module call machinery and unspecialised
    attribute reads (measured ~3% of a BHViT-small forward). They have
    hooks of their own (:meth:`add_hooks`, ``hook(op, args)`` before and
    ``hook(op, args, out)`` after ``forward``), through which the engine
    profiles (each op's ``profile_label``) and records the binarization
    decisions (an op's ``decisions(*args)``); :func:`named_ops` walks them.

    An op whose result adds to a residual may take an ``out`` argument and
    write its result there, e.g. over that residual (:func:`write_out`):
    a hook that needs an op's inputs must read them before it runs.

    With the extension an op may have a *plan* (:meth:`plan`): its kernel
    call with the op's tensors bound once, as a C++ object. A block's plan
    holds those of the ops inside it and runs them all in one call (no
    Python between them), the same functions in the same order; while an
    op inside has hooks (:meth:`hooked_inside`) it runs op by op instead,
    so the hooks see every op.
    """
    profile_label = 'other (float)'

    def __init__(self, dtype: torch.dtype, backend: str):
        self.dtype = dtype
        self.backend = resolve_backend(backend)
        self.ext = load_extension() if self.backend == 'cpp' else None
        self._hooks = None  # (pre hooks, post hooks) or None
        self._plan, self._plan_ext = None, None
        # the ops inside ({path: op}, found once; dicts: named_ops does not
        # walk them), how many of them have hooks, and the ops that have
        # asked whether this one has (kept up to date by add_hooks)
        self._inside = None
        self._hooked_inside = 0
        self._watchers = {}

    def make_plan(self):
        """This op's C++ plan (an object of the extension), or None."""
        return None

    def plan(self):
        """:meth:`make_plan` for the extension in use, built once (again
        if :attr:`ext` is replaced); None without the extension."""
        if self.ext is None:
            return None
        if self._plan_ext is not self.ext:
            self._plan, self._plan_ext = self.make_plan(), self.ext
        return self._plan

    def forward(self, *args):
        raise NotImplementedError

    def __call__(self, *args):
        hooks = self._hooks
        if hooks is None:
            return self.forward(*args)
        for hook in hooks[0]:
            hook(self, args)
        out = self.forward(*args)
        for hook in hooks[1]:
            hook(self, args, out)
        return out

    def hooked_inside(self) -> bool:
        """Whether an op inside this one (:func:`named_ops` below it) has
        hooks (:meth:`add_hooks`); its own do not count. A counter, kept
        by the ops inside from the first call on."""
        if self._inside is None:
            self._inside = dict(list(named_ops(self))[1:])
            for op in self._inside.values():
                op._watchers[id(self)] = self
            self._hooked_inside = sum(op._hooks is not None
                                      for op in self._inside.values())
        return self._hooked_inside > 0

    def _hooks_changed(self, delta: int):
        for op in self._watchers.values():
            op._hooked_inside += delta

    def add_hooks(self, pre=None, post=None):
        """Register hooks; returns a function that removes them."""
        if self._hooks is None:
            self._hooks = ([], [])
            self._hooks_changed(+1)
        added = [(0, pre), (1, post)]
        for i, h in added:
            if h is not None:
                self._hooks[i].append(h)

        def remove():
            for i, h in added:
                if h is not None and self._hooks is not None \
                        and h in self._hooks[i]:
                    self._hooks[i].remove(h)
            if self._hooks is not None and not any(self._hooks):
                self._hooks = None
                self._hooks_changed(-1)

        return remove

    def __repr__(self) -> str:
        return f'{type(self).__name__}(backend={self.backend!r})'


def named_ops(obj, prefix: str = ''):
    """``(path, op)`` of every :class:`PackedOp` reachable from ``obj``
    (an op, an engine module, or lists of them) through its attributes and
    child modules, in definition order; paths as module paths
    (``stages.0.1.token_mixer.q``)."""
    seen = set()

    def walk(value, path):
        if isinstance(value, PackedOp):
            if id(value) in seen:
                return
            seen.add(id(value))
            yield path, value
            for name, v in vars(value).items():
                yield from walk(v, f'{path}.{name}' if path else name)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, f'{path}.{i}' if path else str(i))
        elif isinstance(value, nn.Module):
            items = list(vars(value).items()) + list(
                value._modules.items())
            for name, v in items:
                if isinstance(v, (PackedOp, list, tuple, nn.Module)):
                    yield from walk(v, f'{path}.{name}' if path else name)

    yield from walk(obj, prefix)


class PosEmbed:
    """A positional embedding (NCHW, as stored) at the size of a map,
    channels-last: the model's :func:`~mmbhvit.models.layout.
    resize_pos_embed` (bicubic; none at the trained size), cached for the
    last :attr:`CACHE_SIZES` sizes (keep-ratio inference sees a new size
    per image)."""
    CACHE_SIZES = 8

    def __init__(self, pos_embed: Tensor):
        self.pos_embed = pos_embed
        self.cache: 'OrderedDict[tuple, Tensor]' = OrderedDict()

    def __call__(self, h: int, w: int) -> Tensor:
        key = (h, w)
        pos = self.cache.get(key)
        if pos is None:
            pe = resize_pos_embed(self.pos_embed, (h, w))
            pos = pe[0].permute(1, 2, 0).contiguous()
            self.cache[key] = pos
            while len(self.cache) > self.CACHE_SIZES:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return pos
