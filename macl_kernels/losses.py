"""The drop-in losses: thin adapters that lay inputs out as one call of `grouped_info_nce`.

Common arguments: `temperature` τ (float or 0-d tensor), `normalize` (L2-normalise features first),
`reduction` ("mean" over counted anchors, "sum", "none"), `impl` ("auto", "torch", "triton", "reference"),
`process_group` (cross-device negatives, below), `allow_tf32` (None: torch's TF32 setting; True / False: TF32 /
IEEE dots for float32 features in the Triton kernels; under `torch.autocast` they take the autocast dtype,
see `macl_kernels.precision`).
The reduced loss is float32 (float64 for float64 inputs) whatever the feature dtype.

Cross-device negatives: `process_group="world"` (every rank of the default group) or a
`torch.distributed.ProcessGroup` makes each rank contrast its OWN anchors against the keys of EVERY rank
(gathered with gradient; local loss). The loss is then the single-process loss over the concatenation of the
ranks' batches: the MEAN over ranks of the returned loss equals it, and the gradient DistributedDataParallel
applies (the average over ranks) equals the single-process gradient. The per-rank loss is scaled for this:
L_r = W·S_r/C for "mean" (S_r: sum of this rank's per-anchor losses, C: counted anchors of all W ranks) and
W·S_r for "sum"; so the gradient of a rank's own inputs is W × the single-process gradient of those rows.
"none" returns this rank's rows of the single-process per-anchor loss. Ranks may hold different batch sizes;
they must agree on D and dtype (checked; every rank raises otherwise). A group of one rank, or
process_group=None (the default), changes nothing. A `process_group` when torch.distributed is not initialised
raises RuntimeError. See docs/distributed.md and macl_kernels/distributed/core.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .eager import const_cache, small_path
from .api import Temperature
from .distributed.core import contrast
from .distributed.gather import GroupArg, group_rank, resolve_group, world_size

NEGATIVES = ("image", "batch", "location")


def _prep(x: torch.Tensor) -> torch.Tensor:
    """x itself, checked; normalisation happens inside the core (normalize=), which keeps no normalised copy."""
    if not x.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}")
    return x


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def info_nce(query: torch.Tensor, keys: torch.Tensor, pos_index: Optional[torch.Tensor] = None, *,
             temperature: Temperature = 0.07, normalize: bool = True, reduction: str = "mean",
             impl: str = "auto", process_group: GroupArg = None, allow_tf32: Optional[bool] = None
             ) -> torch.Tensor:
    """InfoNCE: row i's positive is keys[pos_index[i]] (default i); its denominator is all keys.

    query (N, D), keys (M, D) (or batched (G, N, D) / (G, M, D)); keys may be a no-grad memory bank.
    pos_index (N,) or (G, N) int in [0, M). Returns a 0-d loss, or (N,) / (G, N) for reduction="none".
    With `process_group`, the keys are this rank's shard of the global keys (a bank replicated on every rank
    should not be gathered: leave process_group=None), pos_index indexes this rank's own keys, and the loss
    is that of the concatenated queries against the concatenated keys (module docstring).
    """
    _check_tensor("query", query)
    _check_tensor("keys", keys)
    return contrast(_prep(query), _prep(keys), group=resolve_group(process_group), normalize=normalize,
                    temperature=temperature, pos_index=pos_index, reduction=reduction, impl=impl,
                    allow_tf32=allow_tf32)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: Temperature = 0.1, normalize: bool = True,
            reduction: str = "mean", impl: str = "auto", process_group: GroupArg = None,
            allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """SimCLR's NT-Xent. z1, z2 (B, D): two views of B samples. The 2B embeddings are anchors; each
    anchor's denominator is the other 2B − 1; its positive is the other view of its sample.
    Returns a 0-d loss (mean over 2B anchors) or (2, B) per anchor for reduction="none".
    With `process_group`, B is this rank's batch and the denominators span all 2·ΣB embeddings."""
    _check_tensor("z1", z1)
    _check_tensor("z2", z2)
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D) with equal shapes, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    B = z1.shape[0]
    pos = const_cache.other_view_index(B, z1.device)   # (1, 2B): i + B mod 2B, cached and trusted in range
    out = small_path.two_views(z1, z2, pos, temperature, normalize, reduction, impl, process_group)
    if out is not None:   # small problem: straight to the dense torch path (eager/small_path.py)
        return out
    z = _prep(torch.cat([z1, z2]))
    out = contrast(z, group=resolve_group(process_group), temperature=temperature, pos_index=pos,
                   exclude_self=True, reduction=reduction, impl=impl, normalize=normalize,
                   allow_tf32=allow_tf32)
    return out.reshape(2, B) if reduction == "none" else out


def _views_first(features: torch.Tensor, per_sample: torch.Tensor, name: str, any_order: bool = False):
    """(N, D) or (B, V, D) features and (N,) or (B,) metadata -> (V·B, D), (V·B,), and the view count.
    any_order: the caller reduces over anchors (mean or sum), which does not depend on their order, so (B, V, D)
    is laid out sample-major, a view of the features (no copy, no autograd node), instead of view-major."""
    _check_tensor("features", features)
    _check_tensor(name, per_sample)
    if features.dim() == 2:
        if per_sample.shape != features.shape[:1]:
            raise ValueError(f"{name} must have shape ({features.shape[0]},) for features "
                             f"{tuple(features.shape)}, got {tuple(per_sample.shape)}")
        return features, per_sample, 1
    if features.dim() != 3:
        raise ValueError(f"features must be (N, D) or (B, V, D), got shape {tuple(features.shape)}")
    B, V, D = features.shape
    if per_sample.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) for features {tuple(features.shape)}, "
                         f"got {tuple(per_sample.shape)}")
    if any_order:
        return features.reshape(B * V, D), per_sample.repeat_interleave(V), V
    flat = features.transpose(0, 1).reshape(V * B, D)  # view-major, as SupCon's torch.cat(unbind(1))
    return flat, per_sample.repeat(V), V


def _per_anchor_shape(out: torch.Tensor, features: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction != "none" or features.dim() == 2:
        return out
    B, V, _ = features.shape
    return out.reshape(V, B).t()


def sup_con(features: torch.Tensor, labels: torch.Tensor, *, temperature: Temperature = 0.1,
            normalize: bool = True, reduction: str = "mean", impl: str = "auto",
            process_group: GroupArg = None, allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """Supervised contrastive loss L_out (Khosla et al. 2020), without the τ/τ_base rescale.

    features (N, D) or (B, V, D) (V views per sample; every view is an anchor); labels (N,) or (B,) int.
    Each anchor's denominator is every other feature; its positives are the other features of its label.
    Anchors with no positive contribute 0 and are not counted. reduction="none" gives (N,) or (B, V).
    With `process_group`, positives and denominators span the features of every rank.
    """
    flat, lab, _ = _views_first(features, labels, "labels", any_order=reduction != "none")
    out = small_path.self_contrast(_prep(flat), temperature, normalize, reduction, impl, process_group, "label",
                                   lab)
    if out is not None:
        return out
    out = contrast(_prep(flat), group=resolve_group(process_group), temperature=temperature,
                   q_labels=lab, exclude_self=True, reduction=reduction, impl=impl, normalize=normalize,
                   allow_tf32=allow_tf32)
    return _per_anchor_shape(out, features, reduction)


def positional_sup_con(features: torch.Tensor, positions: torch.Tensor, threshold: float = 0.1, *,
                       temperature: Temperature = 0.1, normalize: bool = True, reduction: str = "mean",
                       impl: str = "auto", process_group: GroupArg = None,
                       allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """Positional SupCon (PCL, MACL): `sup_con` whose positives are features whose positions differ by
    less than `threshold` (compared in float32). The other view of the same sample always counts.

    features (N, D) or (B, V, D); positions (N,) or (B,) float (e.g. normalised slice position (i+1)/n).
    With `process_group`, positives and denominators span the features of every rank.
    """
    flat, pos, _ = _views_first(features, positions, "positions", any_order=reduction != "none")
    out = small_path.self_contrast(_prep(flat), temperature, normalize, reduction, impl, process_group, "radius",
                                   pos, threshold)
    if out is not None:
        return out
    out = contrast(_prep(flat), group=resolve_group(process_group), temperature=temperature,
                   q_positions=pos, threshold=threshold, exclude_self=True, reduction=reduction, impl=impl,
                   normalize=normalize, allow_tf32=allow_tf32)
    return _per_anchor_shape(out, features, reduction)


def dense_info_nce(f1: torch.Tensor, f2: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                   negatives: str = "image", temperature: Temperature = 0.1,
                   positions: Optional[torch.Tensor] = None, threshold: Optional[float] = None,
                   symmetric: bool = False, normalize: bool = True, reduction: str = "mean",
                   impl: str = "auto", process_group: GroupArg = None,
                   allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """Pixel/voxel-level contrast between two feature maps aligned voxel-for-voxel.

    f1, f2: (B, C, *spatial), 2D or 3D, same shape. mask: (B, *spatial) bool, voxels that take part (as
    anchors and as keys). Features are normalised over C.
    - negatives="image": anchors are f1's voxels; keys are f2's voxels of the same image; positive = the
      same voxel. "batch": the same with keys from every image of the batch.
      symmetric=True adds the f2→f1 direction and averages the two.
    - negatives="location": MACL's L_d. For each location s, the 2B features {f1[b,:,s], f2[b,:,s]} form
      one group contrasted SupCon-style with self excluded; positives = the other view of the same image
      plus, with `positions` (B,) and `threshold`, features of images whose positions differ by < threshold.
      Mean over all anchors of all locations (= the mean over locations of per-location means).
    reduction="none" gives (B, *spatial) per anchor ("image"/"batch"; (2, B, *spatial) when symmetric),
    or (2, B, *spatial) for "location" (view, image, location).
    With `process_group`: "batch" takes its keys (and their mask) from the images of every rank, and each
    location group of "location" holds the 2·ΣB features of every rank's images at that location; "image"
    keeps its keys within one image, so only its mean becomes global.
    """
    _check_tensor("f1", f1)
    _check_tensor("f2", f2)
    if f1.shape != f2.shape or f1.dim() < 3:
        raise ValueError(f"f1 and f2 must be (B, C, *spatial) maps of equal shape, got {tuple(f1.shape)} "
                         f"and {tuple(f2.shape)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    B, C, spatial = f1.shape[0], f1.shape[1], tuple(f1.shape[2:])
    if C == 0:
        raise ValueError(f"f1 and f2 have C = 0 feature channels (shape {tuple(f1.shape)})")
    L = math.prod(spatial)
    if mask is not None:
        _check_tensor("mask", mask)
        if mask.shape != (B,) + spatial:
            raise ValueError(f"mask must have shape {(B,) + spatial}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if (positions is None) != (threshold is None) and negatives == "location":
        raise ValueError("negatives='location' takes positions and threshold together (or neither)")
    if positions is not None and negatives != "location":
        raise ValueError(f"positions are only used with negatives='location', got negatives={negatives!r}")
    a = _prep(f1.reshape(B, C, L).transpose(1, 2))   # (B, L, C)
    b = _prep(f2.reshape(B, C, L).transpose(1, 2))
    valid = mask.reshape(B, L) if mask is not None else None
    group = resolve_group(process_group)
    common = dict(temperature=temperature, reduction=reduction, impl=impl, group=group, normalize=normalize,
                  allow_tf32=allow_tf32)

    if negatives == "location":
        feats = torch.cat([a, b]).transpose(0, 1)                # (L, 2B, C): group = location
        v = valid.repeat(2, 1).t() if valid is not None else None
        if positions is not None:
            _check_tensor("positions", positions)
            if positions.shape != (B,):
                raise ValueError(f"positions must have shape ({B},), got {tuple(positions.shape)}")
            rule = dict(q_positions=positions.repeat(2).expand(L, 2 * B), threshold=threshold)
        else:
            # sample ids, unique over the ranks of a group (rank r's image b is b·W + r)
            W, rank = world_size(group), group_rank(group)
            ids = torch.arange(B, device=f1.device) * W + rank
            rule = dict(q_labels=ids.repeat(2).expand(L, 2 * B))
        out = contrast(feats, exclude_self=True, q_valid=v, k_valid=v, **rule, **common)
        return out.t().reshape((2, B) + spatial) if reduction == "none" else out

    def one_direction(x, y):
        if negatives == "image":
            return contrast(x, y, gather_keys=False, q_valid=valid, k_valid=valid, **common)
        xv = valid.reshape(B * L) if valid is not None else None
        return contrast(x.reshape(B * L, C), y.reshape(B * L, C), q_valid=xv, k_valid=xv, **common)

    out = one_direction(a, b)
    if symmetric:
        back = one_direction(b, a)
        if reduction == "none":
            return torch.stack([out.reshape((B,) + spatial), back.reshape((B,) + spatial)])
        return (out + back) / 2
    return out.reshape((B,) + spatial) if reduction == "none" else out


# ------------------------------------------------------------------------------------ nn.Module twins

class _LossModule(nn.Module):
    """Holds τ (a buffer, or a learnable parameter with learn_temperature=True) and the common options
    (normalize, reduction, impl, process_group, allow_tf32: see the functions)."""

    def __init__(self, temperature: float, normalize: bool = True, reduction: str = "mean",
                 impl: str = "auto", learn_temperature: bool = False, process_group: GroupArg = None,
                 allow_tf32: Optional[bool] = None):
        super().__init__()
        t = torch.tensor(float(temperature))
        if learn_temperature:
            self.temperature = nn.Parameter(t)
        else:
            self.register_buffer("temperature", t, persistent=False)
        self.learn_temperature = learn_temperature
        self.opts = dict(normalize=normalize, reduction=reduction, impl=impl)
        if process_group is not None:   # resolved at each call: the group may be initialised later
            self.opts["process_group"] = process_group
        if allow_tf32 is not None:
            self.opts["allow_tf32"] = allow_tf32

    def _apply(self, fn, recurse=True):
        # a fixed τ is a setting, not a weight: .half() / .double() / .to(dtype) leave it float32 (in float16 a τ
        # of 0.1 would become 0.09998); device moves still apply. A learnable τ is a parameter and is cast.
        tau = None if self.learn_temperature else self.temperature
        out = super()._apply(fn, recurse)
        if tau is not None and self.temperature.dtype != tau.dtype:
            self.temperature = tau.to(self.temperature.device)
        return out

    def _tau(self):
        # a fixed τ on a CUDA device stays a tensor: float() of it would synchronise with the host every step
        if self.learn_temperature or self.temperature.device.type == "cuda":
            return self.temperature
        return float(self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):g}, learn_temperature={self.learn_temperature}, {self.opts}"


class InfoNCELoss(_LossModule):
    """Module form of `info_nce`: forward(query, keys, pos_index=None)."""

    def __init__(self, temperature: float = 0.07, **kw):
        super().__init__(temperature, **kw)

    def forward(self, query, keys, pos_index=None):
        return info_nce(query, keys, pos_index, temperature=self._tau(), **self.opts)


class NTXentLoss(_LossModule):
    """Module form of `nt_xent`: forward(z1, z2)."""

    def __init__(self, temperature: float = 0.1, **kw):
        super().__init__(temperature, **kw)

    def forward(self, z1, z2):
        return nt_xent(z1, z2, temperature=self._tau(), **self.opts)


class SupConLoss(_LossModule):
    """Module form of `sup_con`: forward(features, labels)."""

    def __init__(self, temperature: float = 0.1, **kw):
        super().__init__(temperature, **kw)

    def forward(self, features, labels):
        return sup_con(features, labels, temperature=self._tau(), **self.opts)


class PositionalSupConLoss(_LossModule):
    """Module form of `positional_sup_con`: forward(features, positions)."""

    def __init__(self, threshold: float = 0.1, temperature: float = 0.1, **kw):
        super().__init__(temperature, **kw)
        self.threshold = threshold

    def forward(self, features, positions):
        return positional_sup_con(features, positions, self.threshold, temperature=self._tau(), **self.opts)


class DenseInfoNCELoss(_LossModule):
    """Module form of `dense_info_nce`: forward(f1, f2, mask=None, positions=None)."""

    def __init__(self, negatives: str = "image", temperature: float = 0.1, threshold: Optional[float] = None,
                 symmetric: bool = False, **kw):
        super().__init__(temperature, **kw)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.negatives, self.threshold, self.symmetric = negatives, threshold, symmetric

    def forward(self, f1, f2, mask=None, positions=None):
        thr = self.threshold if positions is not None else None
        return dense_info_nce(f1, f2, mask, negatives=self.negatives, temperature=self._tau(),
                              positions=positions, threshold=thr, symmetric=self.symmetric, **self.opts)
