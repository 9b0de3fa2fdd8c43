# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Write the golden files of the kernel core's C++ test
(``csrc/tests/test_kernels.cpp``): for every op a few small cases, each the
op's inputs in the kernels' layout and the output of the PyTorch fallback
arithmetic (the ``'torch'`` backend of :mod:`mmbhvit.deploy`: ±1 products as
float matmul / convolution, then the epilogue in the kernels' order), in
float32 and float64.

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

import torch
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmbhvit.deploy.blocks.conv import (chunk_shortcut,  # noqa: E402
                                        conv_shortcut)
from mmbhvit.deploy.ops import (group_sums, kernel_words,  # noqa: E402
                                lane_words, pm1_weight)
from mmbhvit.deploy.packing import bits_to_pm1, pack_bits  # noqa: E402

DEFAULT_OUT = osp.join(ROOT, 'csrc', 'tests', 'goldens')
OPS = dict(proj=0, ffn=1, msgdc=2, merge=3, attn_scores=4, attn_context=5,
           shift=6, attn_tokens=7, attn_untokens=8, conv=9)
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


def prelu(z, slope):
    return torch.where(z > 0, z, z * slope)


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
# the fallback arithmetic of each op, on the extension's arguments
# --------------------------------------------------------------------------
def proj_case(c, cin, cout, shortcut, residual):
    words = c.bits(cout, cin)
    x = c.rand(3, 7, cin)
    t = dict(x=x, thr=c.rand(cin, scale=0.3))
    for n in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
        t[n] = c.rand(cout)
    res = c.rand(3, 7, cout) if residual else None
    d = bits_to_pm1(x > t['thr'], c.dtype) @ pm1_weight(
        words, 1, cin, c.dtype)[:, 0].t()
    z = d * t['a']
    z = z + t['b']
    if shortcut == 'identity':
        z = z + x
    elif shortcut == 'tile':
        r = cout // cin
        z = (z.view(3, 7, r, cin) + x.unsqueeze(-2)).view(3, 7, cout)
    elif shortcut == 'mean':
        r = cin // cout
        z = z + group_sums(x.view(3, 7, cout, r)) / r
    y = prelu(z, t['slope'])
    y = y * t['post_scale']
    y = y + t['post_bias']
    if res is not None:
        y = res + y
        t['residual'] = res
    t['wt'] = kernel_words(words, 1, cin)[0]
    t['meta'] = torch.tensor([cin, cout, SHORTCUTS[shortcut],
                              int(residual)])
    t['out'] = y
    return t


def ffn_case(c, cin, ratio):
    hid = cin * ratio
    e = proj_case(c, cin, hid, 'tile' if ratio > 1 else 'identity', False)
    x = e['out']
    r = proj_case(c, hid, cin, 'mean' if ratio > 1 else 'identity', True)
    # reduce on expand's output (r's random x is replaced)
    words_r = c.bits(cin, hid)
    rt = {k: r[k] for k in ('thr', 'a', 'b', 'slope', 'post_scale',
                            'post_bias', 'residual')}
    d = bits_to_pm1(x > rt['thr'], c.dtype) @ pm1_weight(
        words_r, 1, hid, c.dtype)[:, 0].t()
    z = d * rt['a']
    z = z + rt['b']
    if ratio > 1:
        z = z + group_sums(x.view(3, 7, cin, ratio)) / ratio
    else:
        z = z + x
    y = prelu(z, rt['slope'])
    y = y * rt['post_scale']
    y = y + rt['post_bias']
    y = rt['residual'] + y
    t = {'x': e['x'], 'residual': rt['residual']}
    for k in ('thr', 'wt', 'a', 'b', 'slope', 'post_scale', 'post_bias'):
        t['e_' + k] = e[k]
    for k in ('thr', 'a', 'b', 'slope', 'post_scale', 'post_bias'):
        t['r_' + k] = rt[k]
    t['r_wt'] = kernel_words(words_r, 1, hid)[0]
    t['meta'] = torch.tensor([cin, hid, SHORTCUTS['tile' if ratio > 1 else
                                                  'identity'],
                              SHORTCUTS['mean' if ratio > 1 else 'identity']])
    t['out'] = y
    return t


def msgdc_case(c, n, h, w, ch, groups, dilations):
    cg = ch // groups
    x = c.rand(n, h, w, ch)
    t = dict(x=x)
    for k in ('in_scale', 'in_bias', 'out_scale', 'out_bias', 'n2_scale',
              'n2_bias'):
        t[k] = c.rand(ch)
    t['thr'] = c.rand(ch, scale=0.3)
    v = x * t['in_scale']
    v = v + t['in_bias']
    xs = bits_to_pm1(v > t['thr'], c.dtype).permute(0, 3, 1, 2)
    total = None
    lanes = groups == 4 and cg in (16, 32) and 512 % ch == 0
    for i, d in enumerate(dilations):
        words = c.bits(ch, 9 * cg)
        a, b, sl = c.rand(ch), c.rand(ch), c.rand(ch)
        wgt = pm1_weight(words, 9, cg, c.dtype).view(ch, 3, 3, cg).permute(
            0, 3, 1, 2)
        dot = F.conv2d(xs, wgt, padding=d, dilation=d,
                       groups=groups).permute(0, 2, 3, 1)
        z = dot * a
        z = z + b
        z = prelu(z, sl)
        total = z if total is None else total + z
        t[f'wt{i}'] = kernel_words(words, 9, cg)
        if lanes:
            t[f'lane_wt{i}'] = lane_words(words, cg)
        t[f'a{i}'], t[f'b{i}'], t[f'slope{i}'] = a, b, sl
    tt = total * t['out_scale']
    tt = tt + t['out_bias']
    hh = x + tt
    hn = hh * t['n2_scale']
    hn = hn + t['n2_bias']
    t['meta'] = torch.tensor([groups, len(dilations), int(lanes)] +
                             list(dilations))
    t['out'], t['out_hn'] = hh, hn
    return t


def merge_case(c, n, h, w, cin, cout):
    words = c.bits(cout, 4 * cin)
    x0 = c.rand(n, h, w, cin)
    t = dict(x=x0, thr=c.rand(cin, scale=0.3))
    for k in ('a', 'b', 'slope', 'post_bias'):
        t[k] = c.rand(cout)
    t['pos'] = c.rand(h // 2, w // 2, cout)
    wgt = pm1_weight(words, 4, cin, c.dtype).view(cout, 2, 2, cin).permute(
        0, 3, 1, 2)
    xs = bits_to_pm1(x0 > t['thr'], c.dtype).permute(0, 3, 1, 2)
    dot = F.conv2d(xs, wgt, stride=2).permute(0, 2, 3, 1)
    s = x0[:, 0::2, 0::2] + x0[:, 0::2, 1::2]
    s = s + x0[:, 1::2, 0::2]
    s = s + x0[:, 1::2, 1::2]
    avg = s / 4
    z = dot * t['a']
    z = z + t['b']
    z = z + avg.repeat(1, 1, 1, cout // cin)
    z = prelu(z, t['slope'])
    z = z + t['post_bias']
    t['wt'] = kernel_words(words, 4, cin)
    t['meta'] = torch.tensor([cout])
    t['out'] = z + t['pos']
    return t


def conv_case(c, n, h, w, cin, cout, k):
    words = c.bits(cout, k * k * cin)
    x = c.rand(n, h, w, cin)
    t = dict(x=x, thr=c.rand(cin, scale=0.3))
    for name in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
        t[name] = c.rand(cout)
    shortcut = conv_shortcut(cin, cout)
    wgt = pm1_weight(words, k * k, cin, c.dtype).view(cout, k, k,
                                                      cin).permute(0, 3, 1, 2)
    xs = bits_to_pm1(x > t['thr'], c.dtype).permute(0, 3, 1, 2)
    dot = F.conv2d(xs, wgt, padding=k // 2).permute(0, 2, 3, 1)
    z = dot * t['a']
    z = z + t['b']
    if shortcut != 'none':
        z = z + chunk_shortcut(x, shortcut, cin, cout)
    y = prelu(z, t['slope'])
    y = y * t['post_scale']
    t['wt'] = kernel_words(words, k * k, cin)
    t['meta'] = torch.tensor([cout, k, SHORTCUTS[shortcut]])
    t['out'] = y + t['post_bias']
    return t


def heads(x, nh):
    b, t, ch = x.shape
    return x.view(b, t, nh, ch // nh).transpose(1, 2)


def scores_case(c, b, tk, ch, nh):
    q, k = c.rand(b, tk, ch), c.rand(b, tk, ch)
    t = dict(q=q, k=k, thr_q=c.rand(ch, scale=0.3),
             thr_k=c.rand(ch, scale=0.3))
    scale = (ch // nh)**-0.5
    qs = heads(bits_to_pm1(q > t['thr_q'], c.dtype), nh)
    ks = heads(bits_to_pm1(k > t['thr_k'], c.dtype), nh)
    t['scale'] = torch.tensor([scale], dtype=torch.float64)
    t['meta'] = torch.tensor([nh])
    t['out'] = (qs @ ks.transpose(-2, -1)) * scale
    return t


def context_case(c, b, tk, ch, nh, mode, levels=3):
    q, k, v = c.rand(b, tk, ch), c.rand(b, tk, ch), c.rand(b, tk, ch)
    p = c.probs(b, nh, tk, tk)
    t = dict(p=p, q=q, k=k, v=v, thr_v=c.rand(ch, scale=0.3))
    for n in ('ctx_a', 'ctx_b', 'slope', 'post_bias'):
        t[n] = c.rand(ch)
    vs = heads(bits_to_pm1(v > t['thr_v'], c.dtype), nh).transpose(-2, -1)
    if mode == 'lsq':
        step = c.uniform(nh, lo=0.05, hi=0.3)
        zero = c.uniform(nh, lo=-0.5, hi=0.5)
        u = p * levels
        u = u / step.view(1, -1, 1, 1)
        u = u + zero.view(1, -1, 1, 1)
        lv = torch.round(u).clamp(0, levels)
        ctx = (vs @ lv.transpose(-2, -1)) * step.view(1, -1, 1, 1)
        t['step'], t['zero'] = step, zero
        gsb = [0.0] * 6
    else:
        gsb = [0.05, 0.7, 0.5, 0.25, 0.3, 0.6]  # alpha, a, b1, b2, low, high
        alpha, a, b1, b2, low, high = gsb
        qq = p / alpha
        m = qq.amax(dim=-1, keepdim=True)
        above_high = qq > high * m
        above_low = qq > low * m
        base = torch.round(qq).clamp(0, 1) - above_low.to(p.dtype)
        mid = (above_low & ~above_high).to(p.dtype)
        s0, s1, s2 = (vs @ plane.transpose(-2, -1)
                      for plane in (base, mid, above_high.to(p.dtype)))
        ctx = s0 + b1 * s1
        ctx = ctx + b2 * s2
        ctx = ctx * a
    ctx = ctx.permute(0, 3, 1, 2).reshape(q.shape)
    z = ctx * t['ctx_a']
    z = z + t['ctx_b']
    z = z + q
    z = z + k
    z = z + v
    z = prelu(z, t['slope'])
    t['gsb'] = torch.tensor(gsb, dtype=torch.float64)
    t['meta'] = torch.tensor([nh, int(mode == 'gsb'), levels])
    t['out'] = z + t['post_bias']
    return t


def shift_case(c, n, h, w, ch, taps, residual):
    x = c.rand(n, h, w, ch)
    dy = [dy for dy, _ in taps]
    dx = [dx for _, dx in taps]
    t = dict(x=x, wk=c.rand(len(taps), ch), bias=c.rand(ch))
    acc = None
    for i, (a, b) in enumerate(taps):
        v = t['wk'][i] * torch.roll(x, shifts=(-a, -b), dims=(1, 2))
        acc = (t['bias'] + v) if acc is None else acc + v
    if residual:
        t['res'] = c.rand(n, h, w, ch)
        acc = t['res'] + acc
    t['dy'] = torch.tensor(dy, dtype=torch.int32)
    t['dx'] = torch.tensor(dx, dtype=torch.int32)
    t['meta'] = torch.tensor([int(residual)])
    t['out'] = acc
    return t


def pad_nhwc(x, s):
    h, w = x.shape[1:3]
    return F.pad(x, (0, 0, 0, -w % s, 0, -h % s))


def tokens_case(c, n, h, w, ch, s):
    x = c.rand(n, h, w, ch)
    t = dict(x=x, scale=c.rand(ch), bias=c.rand(ch))
    mix = c.uniform(ch)
    t['mix'], t['rest'] = mix, 1 - mix
    xn = x * t['scale']
    xn = pad_nhwc(xn + t['bias'], s)
    hp, wp = xn.shape[1:3]
    nh, nw = hp // s, wp // s
    wins = xn.reshape(n, nh, s, nw, s, ch).permute(0, 1, 3, 2, 4, 5).reshape(
        n * nh * nw, s * s, ch)
    xc = xn.permute(0, 3, 1, 2)
    mx = F.max_pool2d(xc, s, s, padding=s // 2)
    av = F.avg_pool2d(xc, s, s, padding=s // 2, count_include_pad=True)
    merged = t['mix'].view(-1, 1, 1) * mx + t['rest'].view(-1, 1, 1) * av
    merged = merged.permute(0, 2, 3, 1).reshape(n, 1, nh * nw, ch)
    merged = merged.expand(n, nh * nw, nh * nw, ch).reshape(
        n * nh * nw, nh * nw, ch)
    t['meta'] = torch.tensor([s])
    t['out'] = torch.cat([wins, merged], dim=1)
    return t


def untokens_case(c, n, h, w, ch, s):
    nh, nw = -(-h // s), -(-w // s)
    a = c.rand(n * nh * nw, s * s + nh * nw, ch)
    mix = c.uniform(ch)
    t = dict(a=a, mix=mix, rest=1 - mix)
    win = a[:, :s * s].reshape(n, nh, nw, s, s, ch).permute(0, 1, 3, 2, 4, 5)
    per_window = a[:, s * s:].reshape(n, nh * nw, nh, nw, ch)
    merged = per_window[:, 0]
    for i in range(1, nh * nw):
        merged = merged + per_window[:, i]
    merged = merged / (nh * nw)
    out = win * t['mix'] + merged.view(n, nh, 1, nw, 1, ch) * t['rest']
    t['meta'] = torch.tensor([n, h, w, s])
    t['out'] = out.reshape(n, nh * s, nw * s, ch)[:, :h, :w]
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
]

#: the larger cases, in float32 only (the files stay small)
FLOAT32_ONLY = ('msgdc_words_wide', 'msgdc_lanes32', 'scores_long',
                'context_lsq7', 'context_gsb', 'conv_chunk', 'conv_none5')


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
                  'tokens': 'attn_tokens', 'untokens': 'attn_untokens'}.get(
                      op, op)
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
