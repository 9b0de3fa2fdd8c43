# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Helpers to check the packed engine against the PyTorch model: realistic
random models and comparison statistics (used by tests/test_deploy.py,
tests/test_packed_format.py and the deployment benchmarks)."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def calibrate_random_model(model: nn.Module, input_size: Sequence[int] = (
        128, 128), seed: int = 0, batches: int = 2) -> nn.Module:
    """Turn a randomly initialised BHViT model into a well-conditioned one
    whose every parameter matters, like a trained network:

    * parameters initialised to 0 or to a constant (LayerScales, shift
      branches, learnable shifts, RPReLU shifts and slopes, mixing weights,
      norm affines, positional embeddings) get random values;
    * BatchNorm running statistics are estimated on random images (so the
      activations stay O(1) through the depth), and the LSQ attention
      quantizers take their data-driven initial step.

    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def signed(shape, lo, hi):
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return rand(shape, lo, hi) * sign

    backbone = getattr(model, 'backbone', model)
    for name, p in backbone.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        if leaf in ('bias', 'bias_in', 'bias_out') and p.dim() == 1:
            p.copy_(signed(p.shape, 0.02, 0.2))
        elif '.scales.' in name and leaf == 'scale':  # shift branches (0)
            p.copy_(signed(p.shape, 0.05, 0.2))
        elif leaf in ('scale', 'weight', 'mix', 'out_mix') and p.dim() == 1:
            p.mul_(rand(p.shape, 0.8, 1.2))  # LayerScale, RPReLU, norms
        elif leaf in ('alpha', 'beta1', 'beta2'):
            p.mul_(rand(p.shape, 0.8, 1.2))
        elif leaf == 'pos_embed':
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for _ in range(batches):
        x = torch.randn(2, getattr(backbone, 'in_channels', 3), *input_size,
                        generator=g)
        backbone(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def diff_stats(ours: Tensor, ref: Tensor) -> Dict[str, float]:
    """``max_abs`` |diff|, ``max_rel`` = max |diff| / max |ref|, ``rms_rel``
    = rms(diff) / rms(ref), and ``frac_off``, the fraction of elements that
    differ by more than 1e-3 max |ref|."""
    ours, ref = ours.double(), ref.double()
    d = (ours - ref).abs()
    scale = max(ref.abs().max().item(), 1e-30)
    rms_ref = max(ref.pow(2).mean().sqrt().item(), 1e-30)
    return dict(max_abs=d.max().item(), max_rel=d.max().item() / scale,
                rms_rel=d.pow(2).mean().sqrt().item() / rms_ref,
                frac_off=(d > 1e-3 * scale).double().mean().item(),
                ref_max=scale)


def decision_flips(rec_a, rec_b) -> Dict[str, float]:
    """Compare two recordings of binarization decisions (engine
    ``record()``): total decisions and the fraction that differ."""
    if len(rec_a.items) != len(rec_b.items):
        raise ValueError('recordings of different passes')
    total = flips = 0
    worst = 0.0
    for (na, a), (nb, b) in zip(rec_a.items, rec_b.items):
        if na != nb or a.shape != b.shape:
            raise ValueError(f'recordings differ in structure: {na} vs {nb}')
        n = a.numel()
        f = int((a != b).sum())
        total += n
        flips += f
        worst = max(worst, f / max(n, 1))
    return dict(decisions=total, flips=flips,
                fraction=flips / max(total, 1), worst_layer_fraction=worst)


def _tensors(value) -> List[Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _as_float32(value):
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


@torch.no_grad()
def op_roundoff(engine32, engine64, x: Tensor) -> List[Tuple[str, str,
                                                              float]]:
    """The float32 round-off of every op of a packed engine, one op at a
    time.

    ``engine64`` (float64) runs on ``x``; each time one of its ops runs, the
    same op of ``engine32`` (the same model exported in float32) runs on that
    op's inputs rounded to float32, and its output is compared with the
    float64 op's. Errors therefore do not accumulate from op to op: each
    row is what that op's own float32 arithmetic adds.

    Returns:
        list of ``(path, op type, rms_rel)`` in call order (an op called
        twice gives two rows), ``rms_rel`` as in :func:`diff_stats`, the
        largest over the op's floating outputs.
    """
    from mmbhvit.deploy.ops import named_ops
    ops32 = dict(named_ops(engine32))
    rows, removers = [], []

    def check(path):
        # the op's inputs as they were before it ran (an op may write its
        # result over one of them: its ``out`` argument)
        inputs = []

        def before(op, args):
            inputs.append(_as_float32(args))

        def hook(op, args, out):
            out32 = ops32[path].forward(*inputs.pop())
            errs = [
                diff_stats(b, a)['rms_rel']
                for a, b in zip(_tensors(out), _tensors(out32))
                if a.is_floating_point()
            ]
            rows.append((path, type(op).__name__, max(errs, default=0.0)))

        return before, hook

    for path, op in named_ops(engine64):
        if path not in ops32:
            raise ValueError(f'the two engines differ: {path} is missing '
                             'from the float32 one')
        removers.append(op.add_hooks(*check(path)))
    try:
        engine64(x.double())
    finally:
        for remove in removers:
            remove()
    return rows
