"""Operands of the tiled torch paths (eager/tiled.py, eager/self_tiles.py): q and k as the tiles see them.

With normalize the rows are scaled by 1/max(‖x‖, ε) in per-tile copies, never as whole normalised (N, D) tensors;
each tile worker gets a copy with its own key-block cache and buffers (`worker_copy`).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..rownorm import EPS


class Operands:
    """q and k as the tiles see them: raw, or with normalize the rows scaled by 1/max(‖x‖, ε), never
    materialised. q_inv (G, N), k_inv (G, M) are None without normalize; qn, kn are the operands' norms."""

    def __init__(self, qf: torch.Tensor, kf: torch.Tensor, normalize: bool, same: bool):
        self.qf, self.kf = qf, kf
        qn = torch.linalg.vector_norm(qf, dim=-1)
        kn = qn if same else torch.linalg.vector_norm(kf, dim=-1)
        self.q_inv = self.k_inv = None
        if normalize:
            self.q_inv = qn.clamp(min=EPS).reciprocal_()
            self.k_inv = self.q_inv if same else kn.clamp(min=EPS).reciprocal_()
            qn, kn = qn * self.q_inv, kn * self.k_inv
        self.qn, self.kn = qn, kn
        self._block = None

    def row_factor(self, factor):
        """The per-row multiplier of q's rows in the tiles: `factor` (a float or (G, N, 1) tensor) times
        1/‖q_i‖ with normalize, computed once per pass (a float stays a float without normalize)."""
        return factor if self.q_inv is None else self.q_inv[..., None] * factor

    def q_tile(self, g0, g1, r0, r1, row_factor) -> torch.Tensor:
        """A copy of q rows [r0, r1) times `row_factor` (from `row_factor`: a float or (G, N, 1) tensor), in
        this copy's own buffer when it has one (valid until the next q_tile call)."""
        if isinstance(row_factor, torch.Tensor):
            row_factor = row_factor[g0:g1, r0:r1]
        qt = self.qf[g0:g1, r0:r1]
        return torch.mul(qt, row_factor, out=self._out("_qbuf", qt))

    def k_block(self, g0, g1, c0, c1) -> torch.Tensor:
        """Keys [c0, c1) (k̂ with normalize: one copy per block, kept while the row blocks pass)."""
        if self.k_inv is None:
            return self.kf[g0:g1, c0:c1]
        if self._block is None or self._block[0] != (g0, g1, c0, c1):
            kt = self.kf[g0:g1, c0:c1]
            self._block = ((g0, g1, c0, c1),
                           torch.mul(kt, self.k_inv[g0:g1, c0:c1, None], out=self._out("_kbuf", kt)))
        return self._block[1]

    def _out(self, name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
        buf = getattr(self, name, None)
        if buf is None or buf.numel() < like.numel():
            return None
        return buf[: like.numel()].view(like.shape)

    def worker_copy(self, groups: int, rows: int, keys: int) -> "Operands":
        """The same operands with a key-block cache and q-tile / key-block buffers of their own (one per tile
        worker: nothing is allocated per tile, and nothing in a worker thread's malloc arena)."""
        other = copy.copy(self)
        other._block = None
        D = self.qf.shape[2]
        other._qbuf = self.qf.new_empty(groups * rows * D)
        other._kbuf = self.kf.new_empty(groups * keys * D) if self.k_inv is not None else None
        return other

    def k_hat(self) -> torch.Tensor:
        """k (or k̂ as one (G, M, D) temporary) for the positive operator."""
        return self.kf if self.k_inv is None else self.kf * self.k_inv[..., None]

    def q_hat(self, factor) -> torch.Tensor:
        """factor·q (or factor·q̂) as one (G, N, D) temporary; factor (G, N, 1)."""
        return self.qf * (factor if self.q_inv is None else factor * self.q_inv[..., None])
