"""GCL-style Gradient Mitigator: reconcile the gradients of several meta-label losses on shared features.

GCL (Wu et al., ACM MM 2023) says only that the meta-labels' gradients are reconciled "in a gradient-guided
way" before they update the shared network; it has no public code. This is the documented GCL-style
interpretation, PCGrad (Yu et al., NeurIPS 2020) applied to the gradient with respect to a branch's features:

    g_1 … g_T   the gradients of the T per-label losses w.r.t. the shared feature tensor x (flattened)
    g̃_i = g_i;  for j = 1 … T, j ≠ i (fixed order):  if ⟨g̃_i, g_j⟩ < 0:  g̃_i ← g̃_i − ⟨g̃_i, g_j⟩/‖g_j‖² · g_j
    ∂L/∂x = Σ_i g̃_i      (the network below x receives this; layers above x keep their own gradients)

For two labels the result has a non-negative inner product with both g_1 and g_2, and equals g_1 + g_2 when
they do not conflict. The order over j is fixed (PCGrad shuffles it) so that runs are reproducible.

Use: `copies = mitigate(x, T)` returns T tensors equal to x; compute loss i from copies[i]. One ordinary
`backward()` then delivers each loss's gradient to its own copy, and `_Mitigator.backward` combines them.
Loss weights applied before `backward()` are part of the g_i, as they should be.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def pcgrad(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """PCGrad combination of T same-shaped gradients (see the module docstring), computed in float64
    (float32 inputs) and returned in the dtype and shape of grads[0].

    Raises ValueError for an empty list or mismatched shapes.
    """
    if len(grads) == 0:
        raise ValueError("pcgrad needs at least one gradient")
    shape = grads[0].shape
    for i, g in enumerate(grads):
        if g.shape != shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)}, gradient 0 has {tuple(shape)}")
    flat = [g.reshape(-1).double() for g in grads]
    sq = [float(f @ f) for f in flat]
    total = torch.zeros_like(flat[0])
    for i, gi in enumerate(flat):
        proj = gi.clone()
        for j, gj in enumerate(flat):
            if j == i or sq[j] == 0.0:
                continue
            dot = float(proj @ gj)
            if dot < 0:
                proj -= (dot / sq[j]) * gj
        total += proj
    return total.to(grads[0].dtype).reshape(shape)


class _Mitigator(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int):
        return tuple(x.clone() for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        return pcgrad(list(grads)), None


def mitigate(x: torch.Tensor, n: int, enabled: bool = True) -> Tuple[torch.Tensor, ...]:
    """n copies of x (any shape) whose gradients are combined by `pcgrad` in the backward pass.

    With enabled=False (or n = 1) the copies are x itself: gradients simply add up.
    Raises ValueError for n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not enabled or n == 1 or not x.requires_grad:
        return (x,) * n
    return _Mitigator.apply(x, n)
