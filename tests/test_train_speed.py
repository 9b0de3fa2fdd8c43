# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Training-speed options: ``tools/train.py --compile`` and the train-step
benchmark's bookkeeping (the timings themselves are a benchmark,
``tools/analysis_tools/benchmark_train_step.py``, never a test)."""
import copy
import os.path as osp

import pytest
import torch

from _helpers import REPO, load_tool

DEMO_CFG = osp.join(REPO, 'configs', 'bhvit',
                    'upernet_bhvit-tiny_demo-shapes.py')


@pytest.mark.parametrize('flag', [[], ['--compile']])
def test_train_compile_flag_adds_the_compile_hook(flag):
    """``--compile`` adds :class:`CompileModelHook` (once), not mmengine's
    ``compile=True``; without it nothing is added."""
    train = load_tool('train.py')
    cfg = train.build_cfg(train.parse_args([DEMO_CFG] + flag + flag))
    hooks = [h for h in cfg.get('custom_hooks', None) or []
             if h['type'] == 'CompileModelHook']
    assert len(hooks) == (1 if flag else 0)
    assert cfg.get('compile') is None


def test_compile_hook_compiles_the_backbone_in_place():
    from types import SimpleNamespace

    from mmbhvit.engine import CompileModelHook
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2)
    model.head = torch.nn.Linear(2, 2)
    keys = list(model.state_dict())
    hook, runner = CompileModelHook(), SimpleNamespace(model=model)
    hook.before_train(runner)
    # the first iteration runs eager (data-dependent initialisations)
    assert getattr(model.backbone, '_compiled_call_impl', None) is None
    hook.after_train_iter(runner, 0)
    assert model.backbone._compiled_call_impl is not None
    assert getattr(model.head, '_compiled_call_impl', None) is None
    assert list(model.state_dict()) == keys  # checkpoints unchanged
    with pytest.raises(ValueError, match="no submodule 'neck'"):
        CompileModelHook('neck').before_train(SimpleNamespace(model=model))


def test_benchmark_compares_each_case_with_its_counterparts():
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    names = ['mmbhvit 1-bit', 'mmbhvit 32-bit', 'mmbhvit 1-bit compiled',
             'official 1-bit', 'mmbhvit 1-bit apart']
    assert list(bench.ratio_pairs(names)) == [
        ('mmbhvit 1-bit', 'mmbhvit 32-bit'),
        ('mmbhvit 1-bit', 'official 1-bit'),
        ('mmbhvit 1-bit compiled', 'official 1-bit'),
        ('mmbhvit 1-bit compiled', 'mmbhvit 1-bit'),
        ('mmbhvit 1-bit apart', 'mmbhvit 1-bit'),
    ]


def test_benchmark_runs_a_tiny_step(capsys):
    """The benchmark's step is forward + loss + backward with the gradients
    dropped after: the model is left without gradients."""
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    model = torch.nn.Linear(4, 3)
    x, target = torch.randn(2, 4), torch.tensor([0, 2])
    bench.train_step(model, model, x, target)
    assert all(p.grad is None for p in model.parameters())


def test_benchmark_pointwise_lists_each_layer_shape_and_its_path(
        capsys, monkeypatch):
    """``--pointwise`` finds every binary 1×1 layer shape of the 1-bit
    model, with how many layers have it and which forward each takes
    without the popcount product, as on a CPU with fast int8 products: the
    wide ones on large enough maps the integer product, the 64->512
    expansion on its 32x32 map matrix products, the attention projections
    on 4x4 maps the convolution."""
    from mmbhvit.models.binary import fused
    monkeypatch.setattr(fused, 'int8_products_fast', lambda: True)
    monkeypatch.setattr(fused, 'sign_product_route', lambda x: (
        'integer' if fused.integer_product_ok(x) else None))
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    bench.main(['--pointwise', '--arch', 'tiny', '--batch', '1', '--size',
                '128', '--repeats', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()
            for line in out.splitlines() if '->' in line}
    # tokens: in->out, the 4-d input shape, count, one time per way, taken
    assert rows['64->512'][-1] == 'matmul' and rows['64->512'][5] == '2'
    assert rows['512->64'][-1] == 'integer'
    assert rows['2048->512'][-1] == 'integer'  # 4·4·2048·512 = MIN_WORK
    assert rows['256->256'][-1] == 'conv'
    assert all(len(v.split('/')) == 2 for v in rows['512->64'][6:-1])
    assert 'per step: all conv' in out and 'as taken' in out


@pytest.mark.skipif(__import__('mmbhvit.models.binary.fused', fromlist=['_'])
                    .unavailable_reason() is not None,
                    reason='needs the C++ extension')
def test_benchmark_pointwise_with_the_popcount_product(capsys, monkeypatch):
    """With the extension every binary 1×1 layer of the tiny model at 128
    takes the popcount product (each call has enough work), and the tool
    times that way too; without fast int8 products it says why it leaves
    the integer way out."""
    from mmbhvit.models.binary import fused
    monkeypatch.setattr(fused, 'int8_products_fast', lambda: False)
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    bench.main(['--pointwise', '--arch', 'tiny', '--batch', '1', '--size',
                '128', '--repeats', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if '->' in line and not line.split()[0].startswith('in->')]
    assert len(rows) >= 8 and all(r[-1] == 'popcount' for r in rows)
    assert all(len(r[6:-1]) == 3 for r in rows)  # conv, matmul, popcount
    assert 'integer products not timed' in out
    assert 'all popcount' in out and 'all integer' not in out


def test_benchmark_profile_lists_the_binary_only_ops(capsys):
    """``--profile`` prints per-op self times of both steps: ops only the
    1-bit model runs have a 32-bit time of 0."""
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    bench.main(['--profile', '--arch', 'tiny', '--batch', '1', '--size',
                '64', '--repeats', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith('op '))
    rows = [(line[:56].strip(), [float(v) for v in line[56:].split()])
            for line in lines[head + 1:] if line.strip()]
    assert rows[-1][0] == 'total' and len(rows) > 10
    for name, (one, full, diff) in rows:
        assert abs(one - full - diff) < 0.2, name
    only_binary = {name for name, (one, full, _) in rows[:-1]
                   if one > 0 and full == 0}
    assert only_binary & {'ShiftedSignSTE', 'ShiftedSignSTEBackward',
                          'CentredSignSTE', 'CentredSignSTEBackward',
                          'SignSTE', 'SignSTEBackward'}
    assert rows[-1][1][0] > 0 and rows[-1][1][1] > 0


def _node_names(node) -> set:
    """Class names of the autograd nodes reachable from ``node``."""
    names, stack, seen = set(), [node], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


def test_composed_quantizers_give_the_fused_values_and_gradients():
    """The benchmark's ``--composed`` baseline (the quantizers as composed
    before their fusion) and ``--apart`` (the residual projections' sign
    and shortcut as two consumers) compute the same model: equal logits and
    gradients on a reduced BHViT in float64."""
    from mmbhvit.testing.parity import build_classifier
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    arch = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
    torch.manual_seed(0)
    fused = build_classifier(
        dict(type='BHViT', arch=arch, img_size=64, binary_merge=True),
        5).double().train()
    composed = copy.deepcopy(fused)
    bench.use_composed_quantizers(composed)
    apart = copy.deepcopy(fused)  # --apart: sign and shortcut separate
    bench.separate_sign_and_shortcut(apart)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads, nodes = [], []
    for model in (fused, composed, apart):
        out = model(x, mode='tensor')
        nodes.append(_node_names(out.grad_fn))
        out.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
    shortcut_node = 'ShiftedSignShortcutBackward'
    assert [shortcut_node in n for n in nodes] == [True, False, False]
    assert 'ShiftedSignSTEBackward' in nodes[2]
    for name in grads[0]:  # the shortcut apart: gradients to round-off
        torch.testing.assert_close(grads[0][name], grads[2][name],
                                   rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(fused(x, mode='tensor'),
                               composed(x, mode='tensor'), rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name],
                                   rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.slow
def test_binary_classifier_forward_is_one_graph_for_torch_compile():
    """torch.compile sees the whole binary classifier forward (the
    autocast-aware quantizer Functions included) as one graph: no graph
    break, so no per-layer recompilation (checked with dynamo's eager
    ``explain``; no inductor compilation)."""
    from mmbhvit.testing.parity import build_classifier
    arch = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
    model = build_classifier(dict(type='BHViT', arch=arch, img_size=64),
                             5).train()
    x = torch.randn(2, 3, 64, 64)
    model(x, mode='tensor')  # first step: LSQ initialisation (eager)
    torch._dynamo.reset()
    report = torch._dynamo.explain(lambda x: model(x, mode='tensor'))(x)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_benchmark_modules_splits_both_steps(capsys):
    """``--modules`` times every block part per stage, the forward and the
    backward of both steps: each label once per step, the parts within the
    forward, the stages of the tiny arch all present."""
    bench = load_tool('analysis_tools/benchmark_train_step.py')
    records = bench.main(['--modules', '--arch', 'tiny', '--batch', '1',
                          '--size', '64', '--repeats', '2', '--warmup', '0'])
    for bits in (1, 32):
        rec = records[bits]
        assert {'MSGDC s1', 'MSGDC s2', 'MSMHA s3', 'MSMHA s4',
                'BinaryFFN s4', 'ConvStem', 'PatchMerging'} <= set(rec)
        assert all(len(v) == 2 for v in rec.values())  # warm-up dropped
        parts = [sum(v[i] for k, v in rec.items()
                     if k not in ('forward', 'backward')) for i in range(2)]
        assert all(0 < p <= f for p, f in zip(parts, rec['forward']))
        assert all(b > 0 for b in rec['backward'])
    out = capsys.readouterr().out
    assert 'MSMHA s3' in out and 'backward' in out
