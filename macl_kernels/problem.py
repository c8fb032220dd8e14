"""The validated description of one call of the core operation, shared by every implementation.

The public entry point (`macl_kernels.api.grouped_info_nce`) checks the user's inputs, normalises them
into a `ContrastProblem`, and hands it to one implementation (`reference`, `torch`, `triton`).
Every implementation receives exactly this object, so they cannot disagree on conventions.

Conventions fixed here (see KERNELS.md §1):
- q (G, N, D), k (G, M, D): floating point, same dtype and device. k may be the same tensor as q.
- scale s = 1/τ: a Python float, or a 0-d tensor (float32/float64, same device) that may require grad.
- rule: "index" | "label" | "radius".
  * index:  q_meta = pos_index (G, N) int64 in [0, M); k_meta is None. P(i) = {pos_index_i} ∩ V(i).
  * label:  q_meta = q_labels (G, N) int64, k_meta = k_labels (G, M) int64.
  * radius: q_meta = q_pos (G, N) float32, k_meta = k_pos (G, M) float32 (positions are always compared
            in float32, whatever the feature dtype, so all implementations agree at the threshold),
            threshold > 0. P(i) = {j ∈ V(i) : |q_pos_i − k_pos_j| < threshold}.
- exclude_self: key j == anchor i (same index within a group) is in neither the denominator nor P(i).
- q_valid (G, N) bool or None (all valid); k_valid (G, M) bool or None (all valid).
- normalize: q and k are L2-normalised along D by the implementation itself (fused, so that no normalised
  (N, D) copy has to be kept for autograd); the gradient flows through the normalisation. An implementation
  that does not fuse it yet gets pre-normalised inputs from `api._dispatch` (see `NATIVE_NORMALIZE` there).
  All metadata tensors are contiguous and on the features' device.

Every implementation returns `RowOutputs(loss, lse, count)`:
- loss  (G, N): ℓ_i = LSE_i − mean_{p∈P(i)} z_ip, and exactly 0 where the anchor is invalid or has no
        positive. float32, or float64 for float64 inputs. Differentiable w.r.t. q, k and a tensor scale.
- lse   (G, N): log Σ_{j∈V(i)} exp(z_ij), float32 (float64 for float64 inputs); −inf where V(i) is empty.
- count (G, N) int32: |P(i)| (0 for invalid anchors too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

RULES = ("index", "label", "radius")


@dataclass(frozen=True)
class ContrastProblem:
    q: torch.Tensor
    k: torch.Tensor
    scale: Union[float, torch.Tensor]
    rule: str
    q_meta: torch.Tensor
    k_meta: Optional[torch.Tensor] = None
    threshold: float = 0.0
    exclude_self: bool = False
    q_valid: Optional[torch.Tensor] = None
    k_valid: Optional[torch.Tensor] = None
    normalize: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(G, N, M, D)."""
        G, N, D = self.q.shape
        return G, N, self.k.shape[1], D


class RowOutputs(NamedTuple):
    loss: torch.Tensor
    lse: torch.Tensor
    count: torch.Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-anchor statistics: float64 for float64 features, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
