# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost reports: one :class:`CostRow` per part of a model, gathered in a
:class:`ComplexityReport` that renders as markdown or a dict (JSON)."""
import os.path as osp
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from .counting import BOPS_PER_FLOP


@dataclass
class CostRow:
    """Cost of one part of a model (or of the whole model)."""
    name: str
    params: int = 0
    binary_params: int = 0
    bops: int = 0
    flops: int = 0
    binary_macs: int = 0
    #: 'part' (a piece of a sub-total), 'subtotal', 'total' or 'extra'
    #: (reported apart from the inference total, e.g. an auxiliary head)
    kind: str = 'part'

    @property
    def ops(self) -> float:
        return self.bops / BOPS_PER_FLOP + self.flops

    def __add__(self, other: 'CostRow') -> 'CostRow':
        return CostRow(self.name, self.params + other.params,
                       self.binary_params + other.binary_params,
                       self.bops + other.bops, self.flops + other.flops,
                       self.binary_macs + other.binary_macs, self.kind)

    def to_dict(self) -> dict:
        d = asdict(self)
        d['ops'] = self.ops
        return d


def _fmt(value: float, unit: float, digits: int = 3) -> str:
    return f'{value / unit:.{digits}f}'


@dataclass
class ComplexityReport:
    """Costs of a model built from a config, part by part."""
    config: str
    task: str
    input_shape: Tuple[int, ...]
    full_precision: bool
    count_bn: bool
    rows: List[CostRow] = field(default_factory=list)
    uncounted: Dict[str, int] = field(default_factory=dict)
    #: backbone cost by block type (see
    #: :data:`~mmbhvit.analysis.complexity.BREAKDOWN_TYPES`)
    breakdown: List[CostRow] = field(default_factory=list)

    def row(self, name: str) -> CostRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f'no row {name!r}; rows: {[r.name for r in self.rows]}')

    @property
    def total(self) -> CostRow:
        return next(r for r in self.rows if r.kind == 'total')

    def uncounted_ops(self) -> Dict[str, int]:
        """Operators traced but not counted (mmengine has no handle for
        them), with how many times each ran."""
        return dict(self.uncounted)

    def to_dict(self) -> dict:
        return dict(config=self.config, task=self.task,
                    input_shape=list(self.input_shape),
                    full_precision=self.full_precision,
                    count_bn=self.count_bn,
                    rows=[r.to_dict() for r in self.rows],
                    breakdown=[r.to_dict() for r in self.breakdown],
                    uncounted_ops=self.uncounted_ops())

    def to_markdown(self) -> str:
        """A markdown table (params in M, BOPs/FLOPs/OPs in G = 1e9)."""
        head = ('| part | params (M) | 1-bit params (M) | BOPs (G) | '
                'FLOPs (G) | OPs (G) |')
        lines = [head, '|' + '---|' * 6]
        for r in self.rows:
            name = r.name
            if r.kind == 'part':
                name = '&nbsp;&nbsp;' + name
            elif r.kind in ('total', 'subtotal'):
                name = f'**{name}**'
            lines.append(f'| {name} | {_fmt(r.params, 1e6, 2)} | '
                         f'{_fmt(r.binary_params, 1e6, 2)} | '
                         f'{_fmt(r.bops, 1e9)} | {_fmt(r.flops, 1e9)} | '
                         f'{_fmt(r.ops, 1e9)} |')
        return '\n'.join(lines)

    def breakdown_markdown(self) -> str:
        """The backbone cost by block type, as a markdown table."""
        lines = ['| backbone block type | params (M) | BOPs (G) | FLOPs (G) '
                 '| OPs (G) |', '|' + '---|' * 5]
        for r in self.breakdown:
            lines.append(f'| {r.name} | {_fmt(r.params, 1e6, 2)} | '
                         f'{_fmt(r.bops, 1e9)} | {_fmt(r.flops, 1e9)} | '
                         f'{_fmt(r.ops, 1e9)} |')
        return '\n'.join(lines)

    def summary(self) -> str:
        t = self.total
        shape = '×'.join(str(s) for s in self.input_shape[-2:])
        kind = 'full-precision counterpart' if self.full_precision \
            else 'binary'
        return (f'{osp.basename(self.config)} ({self.task}, {kind}, input '
                f'{shape}): params {t.params / 1e6:.2f} M (1-bit '
                f'{t.binary_params / 1e6:.2f} M), BOPs {t.bops / 1e9:.3f} G, '
                f'FLOPs {t.flops / 1e9:.3f} G, OPs {t.ops / 1e8:.3f} ×10^8')
