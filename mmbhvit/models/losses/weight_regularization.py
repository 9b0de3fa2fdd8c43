# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""The binary weight regularization of BHViT (:math:`L_{re}`).

AdamW keeps nudging latent weights that sit close to 0 across the sign
threshold, so their binary value oscillates. BHViT pulls every binary weight
towards :math:`\pm 1` in the last part of training:

.. math::
    L_{re} = \frac{1}{T} \sum_{t=1}^{T} \frac{1}{|W_t|}
             \sum_{w \in W_t} \big|\,|w| - 1\big|

where :math:`W_1 \dots W_T` are the latent weight tensors of the 1-bit
layers. The tensors are found by layer type (:class:`BinaryConv2d` with
``weight_bits == 1``), not by parameter names.
"""
from typing import Iterator, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...registry import register_model
from ..binary import BinaryConv2d

TypeSpec = Union[str, type]


def _matches(module: nn.Module, types: Sequence[TypeSpec]) -> bool:
    """Whether ``module`` is an instance of one of ``types`` (classes, or
    class names compared with the names in the module's MRO)."""
    for spec in types:
        if isinstance(spec, str):
            if any(c.__name__ == spec for c in type(module).__mro__):
                return True
        elif isinstance(module, spec):
            return True
    return False


@register_model
class BinaryWeightRegLoss(nn.Module):
    r"""Mean distance of the 1-bit latent weights from :math:`\pm 1`.

    ``loss = loss_weight * L_re`` (see the module docstring), computed over the
    model passed to :meth:`forward`. The loss starts disabled in the BHViT
    recipe and is switched on for the last 10% of training by
    :class:`~mmbhvit.engine.RegLossSwitchHook`; a disabled loss returns 0.

    Which layers count: the paper regularizes every binary weight, and so does
    the default here (MSGDC 3×3 convs, MLP expand/reduce, Q/K/V, attention
    output projection and, with ``binary_merge=True``, the 2×2 patch-merging
    convs). The official code selects the tensors by parameter name and so
    leaves out the binary patch-merging conv; ``exclude_within=
    ('PatchMerging',)`` reproduces that.

    Args:
        loss_weight (float): factor :math:`\beta` (0.1 in the paper).
        enabled (bool): initial state; see :meth:`set_enabled`.
        exclude_within (Sequence[str | type]): skip binary layers that sit
            inside a module of one of these types (class or class name,
            subclasses included).
    """

    def __init__(self,
                 loss_weight: float = 0.1,
                 enabled: bool = False,
                 exclude_within: Sequence[TypeSpec] = ()):
        super().__init__()
        if isinstance(exclude_within, (str, type)):
            exclude_within = (exclude_within, )
        for spec in exclude_within:
            if not isinstance(spec, (str, type)):
                raise TypeError('exclude_within takes classes or class names, '
                                f'got {spec!r}')
        self.loss_weight = float(loss_weight)
        self.enabled = bool(enabled)
        self.exclude_within = tuple(exclude_within)

    def set_enabled(self, enabled: bool = True) -> None:
        """Switch the loss on (or off)."""
        self.enabled = bool(enabled)

    def binary_layers(self,
                      model: nn.Module) -> Iterator[Tuple[str, BinaryConv2d]]:
        """Yield ``(name, layer)`` for the regularized layers of ``model``
        (each layer once, even if it is reachable under several names)."""
        seen = set()

        def walk(module: nn.Module, prefix: str):
            for name, child in module.named_children():
                if child is self or id(child) in seen:
                    continue
                seen.add(id(child))
                if _matches(child, self.exclude_within):
                    continue
                full = f'{prefix}.{name}' if prefix else name
                if isinstance(child, BinaryConv2d) and child.weight_bits == 1:
                    yield full, child
                yield from walk(child, full)

        yield from walk(model, '')

    def binary_weights(self, model: nn.Module) -> List[Tensor]:
        """The latent weight tensors that enter :math:`L_{re}`."""
        return [layer.weight for _, layer in self.binary_layers(model)]

    @staticmethod
    def distance(weights: Sequence[Tensor]) -> Tensor:
        r"""Unweighted :math:`L_{re}` of ``weights`` (0 for an empty list)."""
        if not weights:
            return torch.zeros(())
        per_tensor = [(w.abs() - 1).abs().mean() for w in weights]
        return torch.stack(per_tensor).mean()

    def forward(self, model: nn.Module) -> Tensor:
        """``loss_weight * L_re`` of ``model``'s binary weights when enabled,
        a zero (without graph) when disabled."""
        weights = self.binary_weights(model)
        if not self.enabled or not weights:
            ref = weights[0] if weights else None
            return torch.zeros((), device=getattr(ref, 'device', None),
                               dtype=getattr(ref, 'dtype', None))
        return self.loss_weight * self.distance(weights)

    def extra_repr(self) -> str:
        names = [s if isinstance(s, str) else s.__name__
                 for s in self.exclude_within]
        return (f'loss_weight={self.loss_weight}, enabled={self.enabled}, '
                f'exclude_within={names}')
