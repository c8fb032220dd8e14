"""One-line migration: the constructors, defaults and call forms of the contrastive losses people use today,
computed by the fused core (`grouped_info_nce`, through the adapters of `losses.py`).

    you have                                                  write
    lightly.loss.NTXentLoss(temperature=0.5, ...)(z0, z1)     LightlyNTXentLoss(temperature=0.5, ...)(z0, z1)
    monai.losses.ContrastiveLoss(temperature=0.5)(x, y)       MonaiContrastiveLoss(temperature=0.5)(x, y)
    pytorch_metric_learning.losses.NTXentLoss(0.07)(emb, lab) PMLNTXentLoss(0.07)(emb, lab)
    pytorch_metric_learning.losses.SupConLoss(0.1)(emb, lab)  PMLSupConLoss(0.1)(emb, lab)
    SupContrast's SupConLoss(0.07, "all", 0.07)(f, labels)    SupContrastLoss(0.07, "all", 0.07)(f, labels)

Each class takes every argument of the peer's documented constructor (plus a keyword-only `impl=`), with the
peer's defaults, and returns the peer's value and gradient (tests/test_compat.py; float64 ≤ 1e-6 relative).
An argument whose meaning the core cannot reproduce raises `UnsupportedArgument` (a TypeError and a
NotImplementedError) naming it and saying what to do, never silently changes the loss. The loss is float64 for
float64 inputs and float32 otherwise (the core's policy), also where the peer returns float16. Differences from this package's own losses (`nt_xent`, `sup_con`):
- τ defaults are the peers' (0.5, 0.5, 0.07, 0.1, 0.07).
- PML SupCon: `macl_kernels.SupConLoss` is this package's loss, not PML's: a batch of one class gives PML 0 but
  `sup_con` the mean LSE over the positives; `PMLSupConLoss` reproduces PML's call forms (its docstring).
- SupContrast: no L2 normalisation (the reference expects normalised features), the loss is multiplied by
  τ/base_temperature, and anchors without a positive count (as 0) in the mean.
- PML NT-Xent: each positive PAIR (a, p) is one term, -log(e^{z_ap} / (e^{z_ap} + Σ_{n: label_n ≠ label_a} e^{z_an})),
  and the loss is the mean over pairs. With two views per label (SimCLR) this equals `nt_xent`; with several
  positives per label it differs from `sup_con` (whose denominator holds every other positive and which
  averages the positives inside one log). It is computed from the core's per-anchor log-sum-exp over all
  other keys, less the positives' share: LSE_neg(a) = LSE(a) + log(1 − Σ_p e^{z_ap − LSE(a)}). The core does the
  N×M work; the per-pair terms are O(pairs·D). The subtraction loses relative precision in LSE_neg when the
  positives hold almost all of the softmax mass, but the loss term's sensitivity to LSE_neg shrinks by the
  same factor, so the loss and its gradient keep the core's absolute accuracy (times the positives per label).
- lightly with a memory bank (MoCo): term a is -log(e^{z_aa'} / (e^{z_aa'} + Σ_bank e^{z_ab})); the bank's
  log-sum-exp comes from one core call (`info_nce` against the bank), the rest is O(B·D).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .api import grouped_info_nce
from .problem import stats_dtype
from .losses import info_nce, nt_xent

__all__ = ["LightlyNTXentLoss", "MonaiContrastiveLoss", "PMLNTXentLoss", "PMLSupConLoss", "SupContrastLoss",
           "UnsupportedArgument"]


def _dense_labels(labels: torch.Tensor, n: int, name: str = "labels") -> torch.Tensor:
    """Any labels (ints or floats, any shape with n elements) -> int64 (n,) with equal ids for equal values."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    flat = labels.reshape(-1)
    if flat.numel() != n:
        raise ValueError(f"{name} must hold one label per sample ({n}), got shape {tuple(labels.shape)}")
    return torch.unique(flat, return_inverse=True)[1]


# --------------------------------------------------------------------------------------------- lightly

class LightlyNTXentLoss(nn.Module):
    """lightly's `NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`: forward(out0, out1).

    out0, out1 (B, D): two views; both are L2-normalised. memory_bank_size=0: SimCLR, equal to
    `nt_xent(out0, out1, temperature)` (mean over the 2B anchors). memory_bank_size=K > 0 (an int, or lightly's
    (K, D) form, required by lightly ≥ 1.5; a bare K makes the bank at the first call): MoCo, as lightly: the anchors are out0, each one's positive is its out1 row and
    its negatives are the K bank rows (not the other batch rows); the bank starts as random unit vectors and,
    when out0 requires grad, receives out1 (detached, FIFO, after the loss is computed).
    gather_distributed=True: negatives from every rank (`process_group="world"`), the same value as lightly when
    the ranks hold equal batch sizes (with unequal sizes this loss's rank mean is the global loss).
    Returns a 0-d loss (float64 for float64 inputs, float32 otherwise).

    Raises:
        ValueError: |temperature| < 1e-8 (as lightly), a bad memory_bank_size, gather_distributed=True without
            torch.distributed, or out0 / out1 not (B, D) of equal shape.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, impl: str = "auto"):
        super().__init__()
        if abs(float(temperature)) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if float(temperature) < 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available in this torch build")
        size, dim = memory_bank_size, None
        if isinstance(size, (tuple, list)):
            if len(size) not in (1, 2):
                raise ValueError(f"memory_bank_size must be an int, (size,) or (size, dim), got {memory_bank_size!r}")
            size, dim = size[0], (size[1] if len(size) == 2 else None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"memory_bank_size must be an int >= 0, got {memory_bank_size!r}")
        self.temperature = float(temperature)
        self.memory_bank_size = size
        self.gather_distributed = bool(gather_distributed)
        self.impl = impl
        self.register_buffer("bank", torch.empty(0), persistent=False)   # (K, D) once initialised
        self.bank_ptr = 0
        if size > 0 and dim is not None:   # lightly ≥ 1.5: (K, D) makes the bank at once
            self.bank = F.normalize(torch.randn(size, dim), dim=1)

    def _group(self):
        if self.gather_distributed and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return "world"
        return None

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if out0.dim() != 2 or out0.shape != out1.shape:
            raise ValueError(f"out0 and out1 must both be (B, D) with equal shapes, got {tuple(out0.shape)} and "
                             f"{tuple(out1.shape)}")
        if self.memory_bank_size == 0:
            return nt_xent(out0, out1, temperature=self.temperature, impl=self.impl,
                           process_group=self._group())
        a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self.bank.numel() == 0:
            self.bank = F.normalize(torch.randn(self.memory_bank_size, a.shape[1], device=a.device), dim=1).to(a.dtype)
            self.bank_ptr = 0
        bank = self.bank.detach().clone().to(device=a.device, dtype=a.dtype)
        # lightly: -log(e^{z_pos} / (e^{z_pos} + Σ_bank e^{z_neg})) = softplus(LSE_bank − z_pos); LSE_bank from the
        # core: info_nce against the bank with key 0 as positive gives LSE_bank − z_{a,bank_0}.
        first = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
        per = info_nce(a, bank, first, temperature=self.temperature, normalize=False, reduction="none",
                       impl=self.impl)
        lse_bank = per + (a @ bank[0]) / self.temperature
        z_pos = (a * b).sum(1) / self.temperature
        loss = F.softplus(lse_bank - z_pos).mean()
        if out0.requires_grad:
            self._enqueue(b.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, batch: torch.Tensor) -> None:
        if self._group() is not None:   # lightly gathers every rank's out1 before the bank update
            parts = [torch.empty_like(batch) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        size, ptr, n = self.memory_bank_size, self.bank_ptr, batch.shape[0]
        if ptr + n >= size:   # lightly's rule: fill to the end, restart at 0 (the rest of the batch is dropped)
            self.bank[ptr:] = batch[: size - ptr].to(self.bank.dtype)
            self.bank_ptr = 0
        else:
            self.bank[ptr:ptr + n] = batch.to(self.bank.dtype)
            self.bank_ptr = ptr + n


# ----------------------------------------------------------------------------------------------- MONAI

class MonaiContrastiveLoss(nn.Module):
    """MONAI's `ContrastiveLoss(temperature=0.5, batch_size=-1)`: forward(input, target), both (B, F).

    SimCLR over the 2B embeddings with cosine similarity, self excluded, mean over 2B anchors: equal to
    `nt_xent(input, target, temperature)`. batch_size is ignored with MONAI's own warning (MONAI ≥ 1.1 takes
    B from the input too). Raises ValueError for inputs of more than 2 dimensions or of different shapes
    (MONAI's checks).
    """

    def __init__(self, temperature: float = 0.5, batch_size: int = -1, *, impl: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.impl = impl
        if batch_size != -1:
            warnings.warn("batch_size is no longer required to be set. It will be estimated dynamically in the "
                          "forward call")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(target.shape) > 2 or len(input.shape) > 2:
            raise ValueError(f"Either target or input has dimensions greater than 2 where target shape is "
                             f"({target.shape}) and input shape is ({input.shape})")
        if target.shape != input.shape:
            raise ValueError(f"ground truth has differing shape ({target.shape}) from input ({input.shape})")
        if input.dim() == 1:   # B[F] with F absent: one feature per sample, as MONAI's cosine similarity sees it
            input, target = input[:, None], target[:, None]
        return nt_xent(input, target, temperature=self.temperature, impl=self.impl)


# ------------------------------------------------------------------------------------------------- PML

class UnsupportedArgument(TypeError, NotImplementedError):
    """A peer's argument, or a value of it, that the fused core does not reproduce; the message names it and says
    what to do. A TypeError (as an unknown keyword is) and a NotImplementedError (what these raised before)."""


_PML_KWARGS = ("collect_stats", "reducer", "distance", "embedding_regularizer", "embedding_reg_weight")


def _pml_options(loss: str, kwargs: dict, reducers: tuple) -> tuple:
    """PML's loss kwargs (BaseMetricLossFunction) -> (reducer name, normalize). reducers: the reducer class
    names reproduced, the default first. Raises UnsupportedArgument naming the keyword otherwise."""
    unknown = sorted(set(kwargs) - set(_PML_KWARGS))
    if unknown:
        raise TypeError(f"{loss}: unexpected keyword argument(s) {unknown}; PML's loss kwargs are "
                        f"{list(_PML_KWARGS)}")
    reducer, distance = kwargs.get("reducer"), kwargs.get("distance")
    name = reducers[0] if reducer is None else type(reducer).__name__
    if name not in reducers or (name == "AvgNonZeroReducer" and (getattr(reducer, "low", 0) != 0
                                                                  or getattr(reducer, "high", None) is not None)):
        raise UnsupportedArgument(
            f"{loss}: reducer={type(reducer).__name__}() is not reproduced (only {' and '.join(reducers)} with "
            f"default settings); take reduction='none' per-anchor losses from macl_kernels.grouped_info_nce and "
            f"reduce them yourself, or use PML's loss")
    normalize = True
    if distance is not None:
        dname = type(distance).__name__
        if dname not in ("CosineSimilarity", "DotProductSimilarity") or getattr(distance, "p", 2) != 2 \
                or getattr(distance, "power", 1) != 1:
            raise UnsupportedArgument(
                f"{loss}: distance={distance!r} is not reproduced (the core contrasts dot products: only "
                f"CosineSimilarity() and DotProductSimilarity(normalize_embeddings=...)); transform the embeddings "
                f"yourself, or use PML's loss")
        normalize = bool(getattr(distance, "normalize_embeddings", True))
    if kwargs.get("embedding_regularizer") is not None:
        raise UnsupportedArgument(f"{loss}: embedding_regularizer is not reproduced; drop it and add the "
                                  f"regulariser's term to the loss yourself (the core computes the contrastive "
                                  f"term only), or use PML's loss")
    return name, normalize


def _pml_labels(labels, n: int, name: str = "labels") -> torch.Tensor:
    """PML's label checks (1-D, one per embedding; ints, floats or bools compared by value)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1D tensor of shape (batch_size,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"Number of embeddings must equal number of {name}: {n} embeddings, {labels.shape[0]} "
                         f"{name}")
    return labels


def _zero(embeddings: torch.Tensor) -> torch.Tensor:
    """PML's zero loss (sum(embeddings·0): 0 with a zero gradient) in the core's output dtype."""
    return (embeddings * 0).sum().to(stats_dtype(embeddings.dtype))


class PMLNTXentLoss(nn.Module):
    """pytorch-metric-learning's `NTXentLoss(temperature=0.07, **kwargs)`:
    forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None).

    embeddings (N, D), labels (N,): every pair (a, p) of equal labels (a ≠ p) is one term over p and the
    different-label embeddings; the mean over pairs (module docstring). Cosine similarity (embeddings are
    L2-normalised). kwargs: `collect_stats` and `embedding_reg_weight` are accepted (no effect on the loss);
    `reducer` may be None or a MeanReducer, `distance` None or CosineSimilarity (default settings),
    `embedding_regularizer` None. Returns a 0-d loss, float64 for float64 embeddings and float32 otherwise
    (the core's policy; PML returns the embeddings' dtype).

    Raises:
        UnsupportedArgument (a TypeError): indices_tuple (a miner's pairs are chosen pair by pair, the core's
            positives are per label: compute with PML), ref_emb / ref_labels, other reducers / distances /
            regularisers. TypeError: unknown kwargs.
        ValueError: labels missing (PML needs labels or indices_tuple), wrong shapes.
    """

    def __init__(self, temperature: float = 0.07, *, impl: str = "auto", **kwargs):
        super().__init__()
        _pml_options("PMLNTXentLoss", kwargs, ("MeanReducer",))
        if kwargs.get("distance") is not None and type(kwargs["distance"]).__name__ != "CosineSimilarity":
            raise UnsupportedArgument(f"PMLNTXentLoss: distance={kwargs['distance']!r} is not reproduced (only "
                                      f"PML's default CosineSimilarity()); use PML's loss")
        self.temperature = temperature
        self.impl = impl
        self.collect_stats = kwargs.get("collect_stats", False)
        self.embedding_reg_weight = kwargs.get("embedding_reg_weight", 1)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, indices_tuple=None,
                ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if indices_tuple is not None:
            raise UnsupportedArgument("PMLNTXentLoss: indices_tuple (mined pairs) is not reproduced: the fused core "
                                      "picks positives by label for every anchor at once; use PML's NTXentLoss with "
                                      "a miner")
        if ref_emb is not None or ref_labels is not None:
            raise UnsupportedArgument("PMLNTXentLoss: ref_emb / ref_labels are not reproduced; use PML's NTXentLoss "
                                      "for a reference set, or macl_kernels.grouped_info_nce(q, k, q_labels=, "
                                      "k_labels=)")
        if labels is None:
            raise ValueError("labels are required (PML needs labels or indices_tuple); for two views of B samples "
                             "pass torch.arange(B).repeat(2)")
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        lab = _dense_labels(labels, n).to(embeddings.device)
        tau = self.temperature
        # the pair terms in the core's statistics dtype (float32 for half inputs, as the core's LSE)
        x = F.normalize(embeddings.to(stats_dtype(embeddings.dtype)), dim=1)
        a, p = _positive_pairs(lab)
        if a.numel() == 0 or bool((lab == lab[0]).all()):   # no positive pair, or no negative at all: PML's zero
            return _zero(embeddings)
        # LSE over every other key, differentiable: ℓ_i = LSE_i − mean_{P(i)} z  (label rule, self excluded)
        per = grouped_info_nce(embeddings, temperature=tau, q_labels=lab, exclude_self=True, reduction="none",
                               impl=self.impl, normalize=True).loss
        z_ap = (x[a] * x[p]).sum(1) / tau
        count = torch.zeros(n, dtype=z_ap.dtype, device=x.device).index_add_(0, a, torch.ones_like(z_ap))
        mean_pos = torch.zeros(n, dtype=z_ap.dtype, device=x.device).index_add_(0, a, z_ap) / count.clamp(min=1)
        lse = per.to(z_ap.dtype) + mean_pos
        share = torch.zeros(n, dtype=z_ap.dtype, device=x.device).index_add_(0, a, torch.exp(z_ap - lse[a]))
        tiny = torch.finfo(z_ap.dtype).tiny
        lse_neg = lse + torch.log((1 - share).clamp(min=tiny))
        terms = F.softplus(lse_neg[a] - z_ap)
        return terms.mean()


class PMLSupConLoss(nn.Module):
    """pytorch-metric-learning's `SupConLoss(temperature=0.1, **kwargs)`:
    forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None).

    Per anchor: LSE over the other keys − the mean positive logit (as `sup_con`), keys = the batch (self
    excluded) or ref_emb. As PML, in each call form it accepts:
    - 0 (with a zero gradient) when the call has no positive pair or no negative pair at all (a batch of one
      class, all labels distinct), or at most one of each;
    - reduced by PML's default AvgNonZeroReducer (mean over the anchors whose loss is > 0: anchors without a
      positive drop out) or MeanReducer (mean over all N anchors);
    - labels of any dtype compared by value (floats, bools); indices_tuple=None is the labels-only call;
    - ref_emb (M, D) with ref_labels (M,): keys = ref_emb, nothing excluded; ref_labels None (or the labels
      object itself): PML gives ref row j the label labels[j] and excludes the pair (i, i), so only the first N
      ref rows take part (M < N: PML fails with an IndexError; this raises ValueError);
    - ref_labels without ref_emb is ignored (as PML).
    kwargs: `reducer` None / AvgNonZeroReducer() / MeanReducer(), `distance` None / CosineSimilarity() /
    DotProductSimilarity(normalize_embeddings=...), `embedding_regularizer` None; `collect_stats` and
    `embedding_reg_weight` accepted (no effect). Returns a 0-d loss, float64 for float64 embeddings and float32
    otherwise (the core's policy; PML returns the embeddings' dtype).

    Raises:
        UnsupportedArgument (a TypeError): indices_tuple given (a miner's pairs: use PML's SupConLoss), other
            reducers / distances / regularisers. TypeError: unknown kwargs.
        ValueError: no labels (as PML: "labels and indices_tuple cannot both be None"), wrong shapes.
    """

    def __init__(self, temperature: float = 0.1, *, impl: str = "auto", **kwargs):
        super().__init__()
        self.reducer, self.normalize = _pml_options("PMLSupConLoss", kwargs, ("AvgNonZeroReducer", "MeanReducer"))
        self.temperature = temperature
        self.impl = impl
        self.collect_stats = kwargs.get("collect_stats", False)
        self.embedding_reg_weight = kwargs.get("embedding_reg_weight", 1)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, indices_tuple=None,
                ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if indices_tuple is not None:
            raise UnsupportedArgument("PMLSupConLoss: indices_tuple (mined pairs) is not reproduced: the fused core "
                                      "picks positives by label for every anchor at once; leave it out (all pairs), "
                                      "or use PML's SupConLoss with a miner")
        if labels is None:
            raise ValueError("labels and indices_tuple cannot both be None (as PML): pass labels (N,); for two "
                             "views of B samples torch.arange(B).repeat(2)")
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(f"embeddings must be an (N, D) tensor, got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else embeddings!r}")
        n = embeddings.shape[0]
        _pml_labels(labels, n)
        keys, exclude_self = None, True
        if ref_emb is not None:
            if ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_emb must be (M, {embeddings.shape[1]}), got shape {tuple(ref_emb.shape)}")
            if ref_labels is None or ref_labels is labels:    # PML: ref row j takes labels[j], (i, i) excluded
                if ref_emb.shape[0] < n:
                    raise ValueError(f"ref_emb without ref_labels takes labels[j] as the label of ref row j, so it "
                                     f"needs at least N = {n} rows, got {ref_emb.shape[0]} (PML: IndexError); "
                                     f"pass ref_labels (M,)")
                keys = ref_emb[:n]
            else:
                _pml_labels(ref_labels, ref_emb.shape[0], "ref_labels")
                keys, exclude_self = ref_emb, False
        if keys is None or exclude_self:
            lab_q = lab_k = _dense_labels(labels, n).to(embeddings.device)
        else:
            both = _dense_labels(torch.cat([labels.reshape(-1), ref_labels.to(labels.device).reshape(-1)]),
                                 n + ref_emb.shape[0]).to(embeddings.device)
            lab_q, lab_k = both[:n], both[n:]
        m = n if keys is None else keys.shape[0]
        # PML's zero: no positive pair or no negative pair in the call, or at most one of each
        nc = int(max(int(lab_q.max()) if n else -1, int(lab_k.max()) if m else -1)) + 1
        same = int((torch.bincount(lab_q, minlength=nc) * torch.bincount(lab_k, minlength=nc)).sum())
        n_pos = same - (n if exclude_self else 0)
        n_neg = n * m - same
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return _zero(embeddings)
        per = grouped_info_nce(embeddings, keys, temperature=self.temperature, q_labels=lab_q,
                               k_labels=lab_k if keys is not None else None, exclude_self=exclude_self,
                               normalize=self.normalize, reduction="none", impl=self.impl).loss
        per = per.to(stats_dtype(embeddings.dtype))
        if self.reducer == "MeanReducer":
            return per.mean()
        counted = per > 0
        if not bool(counted.any()):
            return _zero(embeddings)
        return per[counted].mean()


def _positive_pairs(lab: torch.Tensor):
    """All ordered pairs (a, p), a ≠ p, of equal labels, without an N×N mask: sort by label, then enumerate
    each label's block. Returns two int64 tensors of length Σ_c n_c (n_c − 1)."""
    order = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab)
    counts = counts[counts > 0]
    starts = torch.cumsum(counts, 0) - counts
    # for each sorted position: its block start and size; each anchor pairs with every other block member
    size_of = torch.repeat_interleave(counts, counts)
    start_of = torch.repeat_interleave(starts, counts)
    pos = torch.arange(lab.numel(), device=lab.device)
    rep = size_of - 1
    anchors_sorted = torch.repeat_interleave(pos, rep)
    # offset within the anchor's block for each partner, skipping the anchor itself
    first = torch.cumsum(rep, 0) - rep
    k = torch.arange(int(rep.sum()), device=lab.device) - torch.repeat_interleave(first, rep)
    own = (anchors_sorted - torch.repeat_interleave(start_of, rep))
    partner = torch.repeat_interleave(start_of, rep) + k + (k >= own).long()
    return order[anchors_sorted], order[partner]


# ------------------------------------------------------------------------------------------ SupContrast

class SupContrastLoss(nn.Module):
    """The SupContrast reference's `SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)`:
    forward(features, labels=None, mask=None).

    features (B, V, ...) (flattened to (B, V, D)), used as given (not normalised, as the reference). labels (B,):
    positives = same label; mask (B, B): positives where mask[i, j] = 1; neither: SimCLR (each sample its own
    class). contrast_mode "all": every view is an anchor; "one": view 0 only. Each anchor's denominator is
    every other feature (all V·B, itself excluded). Loss = (τ/base_temperature) · mean over ALL anchors of
    (LSE − mean positive logit); an anchor without a positive adds 0 and still counts.

    Raises:
        ValueError: features of < 3 dims, labels and mask together, wrong label count, unknown contrast_mode,
            or a mask that is not a same-class relation (0/1, symmetric, ones on the diagonal, transitive):
            the core's positives are classes; a weighted or partial mask must use the reference.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all", base_temperature: float = 0.07,
                 *, impl: str = "auto"):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"Unknown mode: {contrast_mode}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.impl = impl

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if features.dim() < 3:
            raise ValueError("`features` needs to be [bsz, n_views, ...], at least 3 dimensions are required")
        if features.dim() > 3:
            features = features.reshape(features.shape[0], features.shape[1], -1)
        B, V, _ = features.shape
        if labels is not None and mask is not None:
            raise ValueError("Cannot define both `labels` and `mask`")
        if labels is not None:
            if labels.reshape(-1).shape[0] != B:
                raise ValueError("Num of labels does not match num of features")
            lab = _dense_labels(labels, B)
        elif mask is not None:
            lab = _mask_to_labels(mask, B)
        else:
            lab = torch.arange(B, device=features.device)
        lab = lab.to(features.device)
        flat = features.transpose(0, 1).reshape(V * B, -1)   # torch.cat(torch.unbind(features, 1))
        if self.contrast_mode == "all":
            per = grouped_info_nce(flat, temperature=self.temperature, q_labels=lab.repeat(V), exclude_self=True,
                                   reduction="none", impl=self.impl).loss
        else:   # anchors = view 0 (rows 0..B-1 of flat), keys = every view; key i is the anchor itself
            per = grouped_info_nce(features[:, 0], flat, temperature=self.temperature, q_labels=lab,
                                   k_labels=lab.repeat(V), exclude_self=True, reduction="none", impl=self.impl).loss
        return (self.temperature / self.base_temperature) * per.mean()


def _mask_to_labels(mask: torch.Tensor, B: int) -> torch.Tensor:
    """A (B, B) same-class mask -> labels (B,), or ValueError saying why the mask is not one."""
    if not isinstance(mask, torch.Tensor) or mask.shape != (B, B):
        raise ValueError(f"mask must be a (B, B) = ({B}, {B}) tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    m = mask.detach().to(torch.float64)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask has values other than 0 and 1 (weighted positives): the fused core's positives are "
                         "classes; use labels=, or the reference loss for a weighted mask")
    labels = m.argmax(dim=1)   # the first j with mask[i, j] = 1
    same = labels[:, None] == labels[None, :]
    if not bool(torch.equal(same, m.bool())):
        raise ValueError("mask is not a same-class relation (0/1, symmetric, ones on the diagonal, transitive), so "
                         "it cannot be written as labels; the fused core's positives are classes: pass labels=, or "
                         "use the reference loss for an arbitrary mask")
    return labels
