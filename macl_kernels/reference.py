"""Naive ground truth: materialises z = s·q kᵀ (G, N, M) and the positive mask. Small inputs only.

Gradients come from plain autograd through these few lines, so this file is the independent check
for the hand-written backward passes of `torch_tiled` and `triton`. Run it in float64 for the truth.
"""
from __future__ import annotations

import torch

from .problem import ContrastProblem, RowOutputs, stats_dtype


def key_mask(p: ContrastProblem) -> torch.Tensor:
    """V: (G, N, M) bool, the keys allowed in each anchor's denominator."""
    G, N, M, _ = p.shape
    allowed = torch.ones(G, N, M, dtype=torch.bool, device=p.q.device)
    if p.k_valid is not None:
        allowed &= p.k_valid[:, None, :]
    if p.exclude_self:
        i = torch.arange(N, device=p.q.device)[:, None]
        j = torch.arange(M, device=p.q.device)[None, :]
        allowed &= (i != j)[None]
    return allowed


def positive_mask(p: ContrastProblem) -> torch.Tensor:
    """P: (G, N, M) bool, the positives of each anchor (a subset of `key_mask`)."""
    G, N, M, _ = p.shape
    if p.rule == "index":
        j = torch.arange(M, device=p.q.device)
        pos = p.q_meta[:, :, None] == j[None, None, :]
    elif p.rule == "label":
        pos = p.q_meta[:, :, None] == p.k_meta[:, None, :]
    elif p.rule == "radius":
        pos = (p.q_meta[:, :, None] - p.k_meta[:, None, :]).abs() < p.threshold
    else:
        raise ValueError(f"unknown positive rule {p.rule!r}")
    return pos & key_mask(p)


def reference_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count by materialising z. Differentiable by autograd."""
    out_dtype = stats_dtype(p.q.dtype)
    q, k = p.q, p.k
    if p.normalize:   # plain F.normalize in the input dtype: this file is the ground truth
        q = torch.nn.functional.normalize(q, dim=-1)
        k = q if p.k is p.q else torch.nn.functional.normalize(k, dim=-1)
    z = torch.einsum("gnd,gmd->gnm", q, k).to(out_dtype) * p.scale
    allowed = key_mask(p)
    pos = positive_mask(p)
    lse = torch.logsumexp(z.masked_fill(~allowed, float("-inf")), dim=-1)
    count = pos.sum(-1)
    pos_mean = (z * pos).sum(-1) / count.clamp(min=1)
    counted = count > 0
    if p.q_valid is not None:
        counted &= p.q_valid
    # where(), not multiplication: lse is -inf for anchors with no valid key, and 0·inf is NaN.
    loss = torch.where(counted, lse.masked_fill(~counted, 0.0) - pos_mean, torch.zeros_like(pos_mean))
    count = torch.where(p.q_valid, count, 0) if p.q_valid is not None else count
    return RowOutputs(loss, lse.detach(), count.to(torch.int32))
