# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Write the golden files of the kernel core's C++ test
(``csrc/tests/test_kernels.cpp``): for every op a few small cases, each the
op's inputs in the kernels' layout and the output of the op's PyTorch
fallback (the packed op of :mod:`mmbhvit.deploy.blocks` on the ``'torch'``
backend: ±1 products as float matmul / convolution, then the epilogue in the
kernels' order; the engine runs the same code when the extension is
missing), in float32 and float64.

The files are committed (``csrc/tests/goldens``, about 1.1 MB) so the C++
test runs with no Python, also cross-compiled under qemu; they are
deterministic (fixed seeds), and ``tests/test_kernel_core.py`` checks that
this script still writes them byte for byte.

File format (little-endian): ``b'MMBKGLD1'``, uint32 number of arrays, then
per array uint32 name length, the name, uint8 dtype (0 float32, 1 float64,
2 int64, 3 int32), uint8 ndim, int64 dims, the data. Every file has an
int64 array ``op`` (see ``OPS``) and ``meta`` (op-specific integers);
``out*`` arrays are the expected outputs.

Usage::

    python tools/deployment/write_kernel_goldens.py [--out DIR]
"""
import argparse
import os
import os.path as osp
import struct
import sys
from types import SimpleNamespace

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmbhvit.deploy.blocks.conv import (ConvSpec, PackedConv,  # noqa: E402
                                        conv_shortcut)
from mmbhvit.deploy.blocks.merge import MergeSpec, PackedMerge  # noqa: E402
from mmbhvit.deploy.blocks.msgdc import MSGDCSpec, PackedMSGDC  # noqa: E402
from mmbhvit.deploy.blocks.msmha import (  # noqa: E402
    AttentionContext, AttentionScores, window_tokens, window_untokens)
from mmbhvit.deploy.blocks.proj import (FFNSpec, PackedFFN,  # noqa: E402
                                        PackedProj, ProjSpec)
from mmbhvit.deploy.blocks.shift import shift_sum  # noqa: E402
from mmbhvit.deploy.blocks.stem import stem_sum, stem_taps  # noqa: E402
from mmbhvit.deploy.ops import (kernel_words, lane_path_shape,  # noqa: E402
                                lane_words)
from mmbhvit.deploy.packing import pack_bits  # noqa: E402
from mmbhvit.deploy.registry import Params  # noqa: E402
from mmbhvit.models.binary.layers import \
    sign_product_reference  # noqa: E402

DEFAULT_OUT = osp.join(ROOT, 'csrc', 'tests', 'goldens')
OPS = dict(proj=0, ffn=1, msgdc=2, merge=3, attn_scores=4, attn_context=5,
           shift=6, attn_tokens=7, attn_untokens=8, conv=9,
           sign_product=10, stem=11, attention=12)
SHORTCUTS = dict(none=0, identity=1, tile=2, mean=3, chunk_mean=4)
DTYPES = {torch.float32: 0, torch.float64: 1, torch.int64: 2, torch.int32: 3}


def write_file(path, arrays):
    with open(path, 'wb') as f:
        f.write(b'MMBKGLD1')
        f.write(struct.pack('<I', len(arrays)))
        for name, t in arrays.items():
            t = t.contiguous()
            f.write(struct.pack('<I', len(name)) + name.encode())
            f.write(struct.pack('<BB', DTYPES[t.dtype], t.dim()))
            f.write(struct.pack(f'<{t.dim()}q', *t.shape))
            f.write(t.numpy().tobytes())


class Case:
    """Random inputs from one generator, drawn as integers and scaled by
    powers of two and one float64 product: no transcendental function (whose
    last bit may depend on the SIMD level torch picks), so every CPU writes
    the same files. ``rand`` about N(0, scale), ``bits`` random words."""

    def __init__(self, seed, dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def _int(self, lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=self.g,
                             dtype=torch.int64).to(torch.float64)

    def rand(self, *shape, scale=1.0):
        # a sum of 4 uniforms on [-1, 1): mean 0, standard deviation 1.15
        u = sum(self._int(-4096, 4096, shape) for _ in range(4)) / 4096
        return (scale * u).to(self.dtype)

    def uniform(self, *shape, lo=0.0, hi=1.0):
        u = self._int(0, 4096, shape) / 4096
        return (lo + (hi - lo) * u).to(self.dtype)

    def probs(self, *shape):
        """Attention-like maps: non-negative, rows of mean 1 / t and some
        large entries (a softmax's output, without its exp)."""
        t = shape[-1]
        u = self._int(0, 4096, shape) / 4096
        u = u * u * u * (4.0 / t)
        return u.to(self.dtype)

    def bits(self, rows, n):
        return pack_bits(torch.randint(0, 2, (rows, n), generator=self.g) > 0)


# --------------------------------------------------------------------------
# each op's cases: the extension's arguments and the fallback's output
# --------------------------------------------------------------------------
def fallback_op(cls, spec, tensors, dtype):
    """The packed op ``cls`` on the ``'torch'`` backend (its fallback),
    reading its parameters from ``tensors`` (names as in the packed
    file)."""
    params = Params({f'op.{k}': v for k, v in tensors.items()}, 'op', dtype)
    return cls(spec, params, dtype, 'torch')


def attention_spec(ch, nh, attention=None):
    """What the attention ops read from an MSMHASpec."""
    return SimpleNamespace(channels=ch, num_heads=nh, attention=attention)


PROJ_PARAMS = ('thr', 'a', 'b', 'slope', 'post_scale', 'post_bias')


def proj_params(words, t, prefix=''):
    """A projection's parameters as stored, from a case's arrays."""
    params = {prefix + n: t[n] for n in PROJ_PARAMS}
    params[prefix + 'wbits'] = words
    return params


def proj_case(c, cin, cout, shortcut, residual, tokens=(3, 7)):
    return proj_case_words(c, cin, cout, shortcut, residual, tokens)[0]


def proj_case_words(c, cin, cout, shortcut, residual, tokens=(3, 7)):
    """:func:`proj_case` and the sign bits of its weights."""
    words = c.bits(cout, cin)
    x = c.rand(*tokens, cin)
    t = dict(x=x, thr=c.rand(cin, scale=0.3))
    for n in PROJ_PARAMS[1:]:
        t[n] = c.rand(cout)
    res = c.rand(*tokens, cout) if residual else None
    op = fallback_op(PackedProj, ProjSpec(cin, cout, shortcut),
                     proj_params(words, t), c.dtype)
    y = op(x, res)
    if res is not None:
        t['residual'] = res
    t['wt'] = kernel_words(words, 1, cin)[0]
    t['meta'] = torch.tensor([cin, cout, SHORTCUTS[shortcut],
                              int(residual)])
    t['out'] = y
    return t, words


def ffn_case(c, cin, ratio, tokens=(3, 7)):
    hid = cin * ratio
    shortcuts = ('tile', 'mean') if ratio > 1 else ('identity', 'identity')
    e, words_e = proj_case_words(c, cin, hid, shortcuts[0], False, tokens)
    # the reduction's parameters and residual (its x, out and weights are
    # not used: it runs on the expansion's output, with words_r)
    r = proj_case(c, hid, cin, shortcuts[1], True, tokens)
    words_r = c.bits(cin, hid)
    spec = FFNSpec(ProjSpec(cin, hid, shortcuts[0]),
                   ProjSpec(hid, cin, shortcuts[1]), layer_scale=False)
    op = fallback_op(PackedFFN, spec, {
        **proj_params(words_e, e, 'expand.'),
        **proj_params(words_r, r, 'reduce.')}, c.dtype)
    t = {'x': e['x'], 'residual': r['residual']}
    for k in ('thr', 'wt', 'a', 'b', 'slope', 'post_scale', 'post_bias'):
        t['e_' + k] = e[k]
    for k in PROJ_PARAMS:
        t['r_' + k] = r[k]
    t['r_wt'] = kernel_words(words_r, 1, hid)[0]
    t['meta'] = torch.tensor([cin, hid, SHORTCUTS[shortcuts[0]],
                              SHORTCUTS[shortcuts[1]]])
    t['out'] = op(e['x'], r['residual'])
    return t


def msgdc_case(c, n, h, w, ch, groups, dilations):
    cg = ch // groups
    x = c.rand(n, h, w, ch)
    t = dict(x=x)
    for k in ('in_scale', 'in_bias', 'out_scale', 'out_bias', 'n2_scale',
              'n2_bias'):
        t[k] = c.rand(ch)
    t['thr'] = c.rand(ch, scale=0.3)
    params = {k: t[k] for k in ('thr', 'out_scale', 'out_bias')}
    lanes = lane_path_shape(ch, groups)
    for i in range(len(dilations)):
        words = c.bits(ch, 9 * cg)
        params[f'conv{i}.wbits'] = words
        t[f'wt{i}'] = kernel_words(words, 9, cg)
        if lanes:
            t[f'lane_wt{i}'] = lane_words(words, cg)
        for k in ('a', 'b', 'slope'):
            t[f'{k}{i}'] = params[f'conv{i}.{k}'] = c.rand(ch)
    spec = MSGDCSpec(ch, groups, [3, 3], list(dilations))
    op = fallback_op(PackedMSGDC, spec, params, c.dtype)
    hh, hn = op(x, (t['in_scale'], t['in_bias']),
                (t['n2_scale'], t['n2_bias']))
    t['meta'] = torch.tensor([groups, len(dilations), int(lanes)] +
                             list(dilations))
    t['out'], t['out_hn'] = hh, hn
    return t


def merge_case(c, n, h, w, cin, cout, norm=False):
    words = c.bits(cout, 4 * cin)
    x0 = c.rand(n, h, w, cin)
    t = dict(x=x0, thr=c.rand(cin, scale=0.3))
    for k in ('a', 'b', 'slope', 'post_bias'):
        t[k] = c.rand(cout)
    t['pos'] = c.rand(h // 2, w // 2, cout)
    # merge takes the normalised map (an identity input norm here),
    # merge_norm (norm=True) applies the input norm itself
    if norm:
        t['in_scale'], t['in_bias'] = c.rand(cin), c.rand(cin)
    params = {k: t[k] for k in ('thr', 'a', 'b', 'slope', 'post_bias')}
    params.update({'wbits': words,
                   'norm_in.scale': t.get('in_scale', torch.ones(cin)),
                   'norm_in.bias': t.get('in_bias', torch.zeros(cin)),
                   'pos_embed': t['pos'].permute(2, 0, 1)[None]})
    spec = MergeSpec(cin, cout, True, [h // 2, w // 2])
    op = fallback_op(PackedMerge, spec, params, c.dtype)
    t['wt'] = kernel_words(words, 4, cin)
    t['meta'] = torch.tensor([cout])
    t['out'] = op(x0)
    return t


def conv_case(c, n, h, w, cin, cout, k):
    words = c.bits(cout, k * k * cin)
    x = c.rand(n, h, w, cin)
    t = dict(x=x, thr=c.rand(cin, scale=0.3))
    for name in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
        t[name] = c.rand(cout)
    shortcut = conv_shortcut(cin, cout)
    params = {n: t[n] for n in ('thr', 'a', 'b', 'slope', 'post_bias')}
    params['wbits'] = words
    op = fallback_op(PackedConv, ConvSpec(cin, cout, k, shortcut), params,
                     c.dtype)
    # the kernel's post_scale (the engine passes ones) gets random values
    op.post_scale = t['post_scale']
    t['wt'] = kernel_words(words, k * k, cin)
    t['meta'] = torch.tensor([cout, k, SHORTCUTS[shortcut]])
    t['out'] = op(x)
    return t


def sign_product_case(c, n, cin, cout, h, w, with_bias):
    """The training forward of a 1-bit 1x1 layer: NCHW signs (with some
    zeros when there is a bias), a binarized weight (rows of +s_o / -s_o),
    the exact product scaled (the reference of
    :class:`SignProductConv1x1`)."""
    x = torch.where(c.rand(n, cin, h, w) > 0, 1.0, -1.0).to(c.dtype)
    if with_bias:
        x = x * (c.uniform(n, cin, h, w) > 0.05)
    scale = c.uniform(cout, 1, 1, 1, lo=0.25, hi=1.0)
    signs = torch.where(c.rand(cout, cin, 1, 1) > 0, 1.0, -1.0)
    t = dict(x=x, w=signs.to(c.dtype) * scale)
    if with_bias:
        t['bias'] = c.rand(cout)
    t['meta'] = torch.tensor([cout])
    t['out'] = sign_product_reference(x, t['w'], t.get('bias'))
    return t


def scores_case(c, b, tk, ch, nh, table=False):
    """The scores, or with ``table`` (float32) the attention map from the
    softmax table."""
    q, k = c.rand(b, tk, ch), c.rand(b, tk, ch)
    t = dict(q=q, k=k, thr_q=c.rand(ch, scale=0.3),
             thr_k=c.rand(ch, scale=0.3))
    op = fallback_op(AttentionScores, attention_spec(ch, nh),
                     dict(q_thr=t['thr_q'], k_thr=t['thr_k']), c.dtype)
    t['scale'] = torch.tensor([op.scale], dtype=torch.float64)
    t['meta'] = torch.tensor([nh])
    if table:
        assert op.table is not None, 'the table is float32 only'
        t['table'] = op.table
        t['out'] = op(q, k)
    else:
        t['out'] = op.dots(q, k) * op.scale
    return t


def context_params(c, t, ch, nh, mode, levels, steps):
    """The context's epilogue vectors and its quantizer (LSQ steps in the
    range ``steps``, or the GSB values) into the case ``t``; the packed
    file's parameters of the two and the spec's ``attention``."""
    for n in ('ctx_a', 'ctx_b', 'slope', 'post_bias'):
        t[n] = c.rand(ch)
    params = {'v_thr': t['thr_v'], 'ctx.a': t['ctx_a'],
              'ctx.b': t['ctx_b'], 'ctx.slope': t['slope'],
              'ctx.post_bias': t['post_bias']}
    if mode == 'lsq':
        t['step'] = params['lsq.step'] = c.uniform(nh, lo=steps[0],
                                                   hi=steps[1])
        t['zero'] = params['lsq.zero'] = c.uniform(nh, lo=-0.5, hi=0.5)
        attention = dict(binarizer='lsq', levels=levels)
        gsb = [0.0] * 6
    else:
        gsb = [0.05, 0.7, 0.5, 0.25, 0.3, 0.6]  # alpha, a, b1, b2, low, high
        params['gsb'] = torch.tensor(gsb[:4], dtype=torch.float64)
        attention = dict(binarizer='gsb', low=gsb[4], high=gsb[5])
    t['gsb'] = torch.tensor(gsb, dtype=torch.float64)
    t['meta'] = torch.tensor([nh, int(mode == 'gsb'), levels])
    return params, attention


def context_case(c, b, tk, ch, nh, mode, levels=3):
    q, k, v = c.rand(b, tk, ch), c.rand(b, tk, ch), c.rand(b, tk, ch)
    p = c.probs(b, nh, tk, tk)
    t = dict(p=p, q=q, k=k, v=v, thr_v=c.rand(ch, scale=0.3))
    params, attention = context_params(c, t, ch, nh, mode, levels,
                                       (0.05, 0.3))
    params.update(q_thr=torch.zeros(ch), k_thr=torch.zeros(ch))
    op = fallback_op(AttentionContext, attention_spec(ch, nh, attention),
                     params, c.dtype)
    t['out'] = op(p, q, k, v)
    return t


def attention_case(c, b, tk, ch, nh, mode, levels=3):
    """q, k, v to the context in one pass (float32, the softmax table): the
    fallback's map from the table, then its context. Steps so small that
    the rows' levels range over 0 .. levels."""
    q, k, v = c.rand(b, tk, ch), c.rand(b, tk, ch), c.rand(b, tk, ch)
    t = dict(q=q, k=k, v=v)
    for n in ('thr_q', 'thr_k', 'thr_v'):
        t[n] = c.rand(ch, scale=0.3)
    params, attention = context_params(c, t, ch, nh, mode, levels,
                                       (0.02, 0.05))
    params.update(q_thr=t['thr_q'], k_thr=t['thr_k'])
    spec = attention_spec(ch, nh, attention)
    scores = fallback_op(AttentionScores, spec, params, c.dtype)
    context = fallback_op(AttentionContext, spec, params, c.dtype)
    assert scores.table is not None, 'the table is float32 only'
    t['table'] = scores.table
    t['out'] = context(scores(q, k), q, k, v)
    return t


def shift_case(c, n, h, w, ch, taps, residual):
    x = c.rand(n, h, w, ch)
    dy = [dy for dy, _ in taps]
    dx = [dx for _, dx in taps]
    t = dict(x=x, wk=c.rand(len(taps), ch), bias=c.rand(ch))
    if residual:
        t['res'] = c.rand(n, h, w, ch)
    out = shift_sum(x, dy, dx, t['wk'], t['bias'], t.get('res'))
    t['dy'] = torch.tensor(dy, dtype=torch.int32)
    t['dx'] = torch.tensor(dx, dtype=torch.int32)
    t['meta'] = torch.tensor([int(residual)])
    t['out'] = out
    return t


def stem_case(c, n, cin, h, w, cout, gelu, pos):
    """The stem: conv outputs of standard deviation ~2.7, so that GELU's
    erf meets its clamps (|x| > 4 sqrt 2)."""
    x = c.rand(n, cin, h, w)
    weight = c.rand(cout, cin, 4, 4, scale=0.34)
    t = dict(x=x, wt=stem_taps(weight).contiguous(), bias=c.rand(cout))
    if pos:
        t['pos'] = c.rand(h // 4, w // 4, cout)
    t['meta'] = torch.tensor([int(gelu), int(pos)])
    t['out'] = stem_sum(x, t['wt'], t['bias'], t.get('pos'), gelu)
    return t


def tokens_case(c, n, h, w, ch, s):
    x = c.rand(n, h, w, ch)
    t = dict(x=x, scale=c.rand(ch), bias=c.rand(ch))
    mix = c.uniform(ch)
    t['mix'], t['rest'] = mix, 1 - mix
    t['meta'] = torch.tensor([s])
    t['out'] = window_tokens(x, t['scale'], t['bias'], t['mix'], t['rest'],
                             s)
    return t


def untokens_case(c, n, h, w, ch, s):
    nh, nw = -(-h // s), -(-w // s)
    a = c.rand(n * nh * nw, s * s + nh * nw, ch)
    mix = c.uniform(ch)
    t = dict(a=a, mix=mix, rest=1 - mix)
    t['meta'] = torch.tensor([n, h, w, s])
    t['out'] = window_untokens(a, t['mix'], t['rest'], n, h, w, s)
    return t


# (name, function, args): widths off the word size, partial output blocks,
# every shortcut, both MSGDC paths, LSQ with 2 and 3 bit planes, GSB
CASES = [
    ('proj_identity', proj_case, (70, 70, 'identity', True)),
    ('proj_tile', proj_case, (40, 120, 'tile', False)),
    ('proj_mean2', proj_case, (96, 48, 'mean', True)),
    ('proj_mean3', proj_case, (72, 24, 'mean', False)),
    ('proj_none', proj_case, (130, 20, 'none', False)),
    ('ffn_ratio2', ffn_case, (48, 2)),
    ('ffn_ratio1', ffn_case, (36, 1)),
    ('msgdc_words', msgdc_case, (2, 5, 7, 24, 2, (1, 2, 3))),
    ('msgdc_words_wide', msgdc_case, (1, 3, 4, 144, 2, (1, 2))),
    ('msgdc_lanes16', msgdc_case, (1, 4, 5, 64, 4, (1, 2, 3))),
    ('msgdc_lanes32', msgdc_case, (1, 3, 4, 128, 4, (1, 2))),
    ('merge_tile', merge_case, (2, 6, 4, 24, 48)),
    ('merge_same', merge_case, (1, 4, 6, 70, 70)),
    ('scores', scores_case, (2, 13, 48, 3)),
    ('scores_long', scores_case, (1, 65, 72, 1)),
    ('context_lsq', context_case, (2, 13, 48, 3, 'lsq', 3)),
    ('context_lsq7', context_case, (1, 65, 24, 1, 'lsq', 7)),
    ('context_gsb', context_case, (1, 65, 24, 1, 'gsb')),
    ('shift', shift_case, (2, 5, 6, 12, [(0, 1), (1, 0), (-2, 0), (0, -3)],
                           True)),
    ('shift_nores', shift_case, (1, 4, 4, 10, [(1, 1), (-1, 2)], False)),
    ('tokens', tokens_case, (2, 7, 8, 12, 3)),
    ('untokens', untokens_case, (2, 7, 8, 12, 3)),
    # binary convolution blocks of the heads: every shortcut, border and
    # interior pixels, a 5x5 kernel, a map narrower than the kernel
    ('conv_identity', conv_case, (2, 5, 9, 40, 40, 3)),
    ('conv_chunk', conv_case, (1, 4, 7, 96, 32, 3)),
    ('conv_tile', conv_case, (1, 3, 6, 24, 72, 3)),
    ('conv_none5', conv_case, (1, 6, 8, 20, 28, 5)),
    ('conv_narrow', conv_case, (1, 2, 1, 70, 70, 3)),
    # the model's nine taps on enough channels for the shift kernel's
    # blocks of four vectors, single vectors and scalar tail
    ('shift_wide', shift_case, (1, 3, 5, 45,
                                [(-2, 0), (-1, 0), (0, -2), (0, -1), (0, 0),
                                 (0, 1), (0, 2), (1, 0), (2, 0)], True)),
    # merge_norm: the input norm applied in the kernel (last: the cases
    # before keep their seeds)
    ('merge_norm', merge_case, (2, 6, 8, 40, 80, True)),
    # the training forward of 1-bit 1x1 layers: a partial word of
    # channels, partial blocks of outputs, a tile of pixels and a part
    ('sign_product_bias', sign_product_case, (2, 70, 13, 9, 11, True)),
    ('sign_product_wide', sign_product_case, (1, 130, 20, 3, 3, False)),
    # more (tap, word) steps than a byte count holds (9 taps x 4 words):
    # the popcount core folds between chunks, also in the middle of a tap;
    # a tile of 8 interior pixels and a masked block of outputs
    ('conv_deep', conv_case, (1, 3, 11, 200, 38, 3)),
    # an MLP whose expansion the AVX2 kernels read from the nibble table
    # (64 inputs; 165 tokens: the C++ test's middle chunk of 82 holds a
    # whole block of 64 tokens, every chunk a partial reduction tile)
    ('ffn_nibbles', ffn_case, (64, 8, (3, 55))),
    # the shift kernel's runs of 4 interior pixels (13 columns: two runs
    # and single border pixels per row; rows split between the chunks) on
    # blocks of 2 vectors, a single vector and a scalar tail
    ('shift_runs', shift_case, (2, 4, 13, 29,
                                [(-2, 0), (-1, 0), (0, -2), (0, -1), (0, 0),
                                 (0, 1), (0, 2), (1, 0), (2, 0)], True)),
    # MSGDC as in stage 1 (16-bit groups, dilations 1, 3, 5) on a map with
    # pixels whose taps all lie inside it for every dilation
    ('msgdc_inner', msgdc_case, (1, 12, 13, 64, 4, (1, 3, 5))),
    # the float32 attention map from the softmax table: rows of 37 keys
    # (a partial block of 8), groups of 4 rows and a single one, rows
    # split between the test's chunks
    ('scores_table', scores_case, (2, 37, 96, 2, True)),
    # an MLP of ratio 4 on 3 input words (136 channels: the tile shortcut
    # wraps inside a block of 32 hidden outputs), which the AVX-512 kernels
    # expand without storing the hidden values (group means from registers)
    ('ffn_ratio4', ffn_case, (136, 4)),
    # the stem: 70 outputs (a block of 8 vectors, single vectors and a
    # scalar tail in float64; a block and the tail in float32), runs of
    # pixels cut at the image boundary, and without GELU and embedding
    ('stem', stem_case, (2, 3, 8, 12, 70, True, True)),
    ('stem_plain', stem_case, (1, 4, 4, 8, 24, False, False)),
    # MSMHA's attention in one pass: LSQ levels by count (2 planes: 8 keys
    # at a time on AVX2 / AVX-512; 3 planes: one by one; 2 words of keys),
    # GSB from the map row; rows split between the test's chunks
    ('attention_lsq', attention_case, (2, 37, 96, 2, 'lsq', 3)),
    ('attention_lsq7', attention_case, (1, 70, 24, 1, 'lsq', 7)),
    ('attention_gsb', attention_case, (1, 29, 40, 2, 'gsb')),
    # patch merging that packs its windows' sign bits itself over 3 words
    # per pixel (136 channels: the last word partial), with and without
    # the input norm (AVX2: one pass for the bits and the shortcut)
    ('merge_words', merge_case, (1, 4, 6, 136, 272)),
    ('merge_words_norm', merge_case, (2, 2, 4, 136, 136, True)),
]

#: the larger cases, in float32 only (the files stay small)
FLOAT32_ONLY = ('msgdc_words_wide', 'msgdc_lanes32', 'scores_long',
                'context_lsq7', 'context_gsb', 'conv_chunk', 'conv_none5',
                'conv_deep', 'ffn_nibbles', 'msgdc_inner', 'scores_table',
                'attention_lsq', 'attention_lsq7', 'attention_gsb',
                'merge_words')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = []
    for seed, (name, fn, fargs) in enumerate(CASES):
        dtypes = [(torch.float32, 'f32'), (torch.float64, 'f64')]
        if name in FLOAT32_ONLY:
            dtypes = dtypes[:1]
        for dtype, suffix in dtypes:
            t = fn(Case(1000 + seed, dtype), *fargs)
            op = name.split('_')[0]
            op = {'scores': 'attn_scores', 'context': 'attn_context',
                  'tokens': 'attn_tokens', 'untokens': 'attn_untokens',
                  'sign': 'sign_product'}.get(op, op)
            arrays = {'op': torch.tensor([OPS[op]])}
            arrays.update(t)
            fname = f'{name}_{suffix}.bin'
            write_file(osp.join(args.out, fname), arrays)
            names.append(fname)
    with open(osp.join(args.out, 'MANIFEST'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    print(f'wrote {len(names)} golden files to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
