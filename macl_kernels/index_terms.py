"""The positive term of the index rule (one positive per anchor) in row chunks: no (N, D) temporaries.

The tiled path handles positives outside the tiles (positives.py); for the index rule P(i) = {idx_i} the
forward needs ⟨q̂_i, k̂_{idx_i}⟩ and the backward dq_i −= c_i·k̂_{idx_i}, dk_{idx_i} −= c_i·q̂_i. Gathering
k[idx] whole costs an (N, D) copy per use (8 MiB at N = 16384, D = 128, several at once in the backward),
which is most of what the path allocates beyond the gradients; CHUNK rows at a time bound it to CHUNK·D.
q̂ = q·q_inv and k̂ = k·k_inv with normalize; q_inv / k_inv None means the raw features.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK = 2048


def _scaled(x: torch.Tensor, inv: Optional[torch.Tensor]) -> torch.Tensor:
    return x if inv is None else x * inv.unsqueeze(-1)


def pos_dot(qf: torch.Tensor, kf: torch.Tensor, idx: torch.Tensor, q_inv: Optional[torch.Tensor],
            k_inv: Optional[torch.Tensor]) -> torch.Tensor:
    """⟨q̂_i, k̂_{idx_i}⟩ (G, N) for q (G, N, D), k (G, M, D), idx (G, N) int64."""
    G, N, D = qf.shape
    out = qf.new_empty(G, N)
    for r0 in range(0, N, CHUNK):
        r1 = min(N, r0 + CHUNK)
        ix = idx[:, r0:r1]
        kg = torch.gather(kf, 1, ix.unsqueeze(-1).expand(G, r1 - r0, D))
        d = torch.einsum("gnd,gnd->gn", qf[:, r0:r1], kg)
        if q_inv is not None:
            d *= q_inv[:, r0:r1] * torch.gather(k_inv, 1, ix)
        out[:, r0:r1] = d
    return out


def sub_pos_grads_(dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], qf: torch.Tensor, kf: torch.Tensor,
                   idx: torch.Tensor, coef: torch.Tensor, q_inv: Optional[torch.Tensor],
                   k_inv: Optional[torch.Tensor]) -> None:
    """In place: dq_i −= c_i·k̂_{idx_i} and dk_{idx_i} −= c_i·q̂_i (gradients w.r.t. q̂, k̂); coef c (G, N)."""
    G, N, D = qf.shape
    for r0 in range(0, N, CHUNK):
        r1 = min(N, r0 + CHUNK)
        ix, c = idx[:, r0:r1], coef[:, r0:r1]
        if q_inv is not None:
            c = c * q_inv[:, r0:r1]            # the q̂ side of c·q̂; k̂'s factor is gathered below
        if dq is not None:
            kc = c if k_inv is None else coef[:, r0:r1] * torch.gather(k_inv, 1, ix)
            kg = torch.gather(kf, 1, ix.unsqueeze(-1).expand(G, r1 - r0, D))
            dq[:, r0:r1].addcmul_(kg, kc.unsqueeze(-1), value=-1.0)
        if dk is not None:
            src = qf[:, r0:r1] * c.unsqueeze(-1)
            dk.scatter_add_(1, ix.unsqueeze(-1).expand(G, r1 - r0, D), src.neg_())
