"""ARCO (You et al., NeurIPS 2023): the loss pieces of the semi-supervised method; the loop is `macl.semi`.

Notation: student representation r (B, D, *S) with gradient; teacher (EMA) representation r̄ and
probabilities p̄ (no gradient); labels y (B, *S): ground truth for labelled images, the teacher's pseudo-label
for the (CutMix-ed, strongly augmented) unlabelled ones; the student's entropy H on unlabelled pixels.

Masks per class c (`contrast_masks`), as the public code (`compute_contra_memobank_loss`):
- reliable ("low") pixels: every labelled pixel; unlabelled pixels with H ≤ the α_t-percentile of H over the
  unlabelled pixels, α_t = α_0·(1 − step/steps) (α_0 = 20; the public code counts epochs).
- valid_c = reliable ∧ y = c;  anchors_c = valid_c ∧ p̄_c > 0.3 (`anchor_threshold`);
  prototype_c = mean of r̄ over valid_c (a constant).
- negatives of c pushed into the memory bank of class c (teacher features, no gradient): labelled pixels with
  y ≠ c whose teacher ranks c among its top `low_rank` (3) classes; unreliable ("high": H ≥ the
  (100 − α_t)-percentile) unlabelled pixels with y ≠ c whose teacher ranks c in [low_rank, high_rank) (3, 20);
  both with p̄_c < `negative_threshold` (0.97). This is U2PL's rule written with "y ≠ c" explicitly (the
  public code multiplies by the one-hot of c instead, which leaves labelled negatives empty).

The contrast (`prototype_contrast`, through `macl_kernels`): for each class c with anchors and a non-empty bank,
    ℓ_a = −log( exp(cos(r_a, proto_c)/τ) / (exp(cos(r_a, proto_c)/τ) + Σ_{n∈neg(a)} exp(cos(r_a, n)/τ)) ),
τ = 0.5, averaged over the anchors, then over the classes that contributed (the public code returns 0 when
fewer than two classes are present). Sampled mode: 256 anchors per class drawn by the sampler (`macl.semi.sampling`:
"sg", "sag", "ns", "index_sg", "index_sag"), and for every anchor its own 512 negatives drawn from the bank by
the same sampler over the bank entries' unit coordinates (one grouped core call, G = anchors). "all" mode:
every anchor against the prototype and the whole bank (one core call per class, never an A×M matrix).

Nearest-neighbour term (`nn_term`): the public code's `get_revisiting_loss` picks, for each unlabelled image,
the top-5 entries of a FIFO of 36 teacher maps nearest to the STUDENT map, then averages the TEACHER map's
distance to them: both distances' gradients are cut (indices carry none, the teacher none), so the term has
NO gradient; with weight 1.0 it only shifts the logged loss. mode "public" reproduces that (logged, no
gradient, the documented default); "student" is our gradient-carrying variant (neighbours chosen by the
teacher map, distance measured from the student map); "off" skips it.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from macl_kernels import grouped_info_nce, info_nce

from .sampling import sample, unit_coords

NN_MODES = ("public", "student", "off")


# ------------------------------------------------------------------------------------------ memory bank
class ClassMemoryBank(nn.Module):
    """One FIFO queue per class of (feature (D,), unit coordinates (d,)) pairs, fixed sizes, stored as
    buffers (so it moves with `.to(device)` and is saved in `state_dict`).

    push(c, keys (n, D), coords (n, d)): appends; when full the oldest entries are overwritten; of a push of
    n ≥ size only the last `size` entries stay. get(c) → (keys (m, D), coords (m, d)), oldest first, m ≤ size.
    """

    def __init__(self, sizes: Sequence[int], dim: int, coord_dims: int):
        super().__init__()
        if not sizes or min(int(s) for s in sizes) < 1:
            raise ValueError(f"bank sizes must be positive, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.dim, self.coord_dims = int(dim), int(coord_dims)
        for c, s in enumerate(self.sizes):
            self.register_buffer(f"keys_{c}", torch.zeros(s, self.dim))
            self.register_buffer(f"coords_{c}", torch.zeros(s, self.coord_dims))
        self.register_buffer("ptr", torch.zeros(len(self.sizes), dtype=torch.long))
        self.register_buffer("count", torch.zeros(len(self.sizes), dtype=torch.long))

    def _check(self, c: int) -> None:
        if not 0 <= c < len(self.sizes):
            raise ValueError(f"class {c} out of range for a bank of {len(self.sizes)} classes")

    @torch.no_grad()
    def push(self, c: int, keys: torch.Tensor, coords: torch.Tensor) -> None:
        """Enqueue keys (n, D) with their coords (n, d) into class c's queue (detached, cast to the bank)."""
        self._check(c)
        if keys.dim() != 2 or keys.shape[1] != self.dim or coords.shape != (keys.shape[0], self.coord_dims):
            raise ValueError(f"push wants keys (n, {self.dim}) and coords (n, {self.coord_dims}), got "
                             f"{tuple(keys.shape)} and {tuple(coords.shape)}")
        size = self.sizes[c]
        n = keys.shape[0]
        if n == 0:
            return
        if n > size:
            keys, coords, n = keys[-size:], coords[-size:], size
        buf, cbuf = getattr(self, f"keys_{c}"), getattr(self, f"coords_{c}")
        p = int(self.ptr[c])
        idx = (torch.arange(n, device=buf.device) + p) % size
        buf[idx] = keys.detach().to(buf)
        cbuf[idx] = coords.detach().to(cbuf)
        self.ptr[c] = (p + n) % size
        self.count[c] = min(size, int(self.count[c]) + n)

    def get(self, c: int):
        """(keys (m, D), coords (m, d)) of class c, oldest first."""
        self._check(c)
        m, p, size = int(self.count[c]), int(self.ptr[c]), self.sizes[c]
        buf, cbuf = getattr(self, f"keys_{c}"), getattr(self, f"coords_{c}")
        if m < size:
            return buf[:m], cbuf[:m]
        order = (torch.arange(size, device=buf.device) + p) % size
        return buf[order], cbuf[order]


# ------------------------------------------------------------------------------------------ masks
def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """np.percentile(x, q) (linear interpolation) of a 1-D tensor; q in [0, 100]. Raises ValueError if empty."""
    if x.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    v = torch.sort(x.reshape(-1).double()).values
    pos = (v.numel() - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).to(x.dtype)


class ContrastMasks(NamedTuple):
    """(B, *S) bool masks per class (lists of length K): valid (prototype pixels), anchors, negatives."""

    valid: List[torch.Tensor]
    anchors: List[torch.Tensor]
    negatives: List[torch.Tensor]


@torch.no_grad()
def contrast_masks(labels: torch.Tensor, teacher_prob: torch.Tensor, student_prob: torch.Tensor,
                   labelled: torch.Tensor, alpha: float, anchor_threshold: float = 0.3,
                   negative_threshold: float = 0.97, low_rank: int = 3, high_rank: int = 20) -> ContrastMasks:
    """The masks of the module docstring.

    labels (B, *S) int64; teacher_prob, student_prob (B, K, *S); labelled (B,) bool; alpha = α_t in [0, 100].
    """
    K = teacher_prob.shape[1]
    ent = -(student_prob * torch.log(student_prob + 1e-10)).sum(1)          # (B, *S)
    lab = labelled.view(-1, *([1] * (labels.dim() - 1))).expand_as(labels)
    unl = ~lab
    low, high = lab.clone(), lab.clone()
    if bool(unl.any()):
        e = ent[unl]
        low |= unl & (ent <= percentile(e, alpha))
        high |= unl & (ent >= percentile(e, 100.0 - alpha))
    rank = torch.argsort(torch.argsort(teacher_prob, dim=1, descending=True), dim=1)   # rank of each class
    valid, anchors, negatives = [], [], []
    for c in range(K):
        v = low & (labels == c)
        valid.append(v)
        anchors.append(v & (teacher_prob[:, c] > anchor_threshold))
        not_c = (labels != c) & (teacher_prob[:, c] < negative_threshold)
        neg_l = lab & not_c & (rank[:, c] < low_rank)
        neg_u = unl & high & not_c & (rank[:, c] >= low_rank) & (rank[:, c] < high_rank)
        negatives.append(neg_l | neg_u)
    return ContrastMasks(valid, anchors, negatives)


def pixels(rep: torch.Tensor, mask: torch.Tensor):
    """Features (n, D) and unit coordinates (n, d) of the pixels where mask (B, *S) is true; rep (B, D, *S)."""
    B, D = rep.shape[:2]
    spatial = tuple(rep.shape[2:])
    flat = mask.reshape(B, -1)
    b, s = flat.nonzero(as_tuple=True)
    feats = rep.reshape(B, D, -1)[b, :, s]
    return feats, unit_coords(s, spatial).to(rep.dtype)


# ------------------------------------------------------------------------------------------ contrast
def prototype_contrast(anchors: torch.Tensor, prototype: torch.Tensor, negatives: torch.Tensor,
                       temperature: float = 0.5, impl: str = "auto") -> torch.Tensor:
    """Mean over anchors of the cross-entropy over [prototype, negatives] of cosine logits / τ.

    anchors (A, D) (may require grad); prototype (D,); negatives (A, K, D) (each anchor its own) or (K, D)
    (shared). The keys carry no gradient. One `macl_kernels` call; returns a 0-d tensor.
    """
    proto = prototype.detach()
    negs = negatives.detach()
    if negs.dim() == 3:
        A = anchors.shape[0]
        k = torch.cat([proto.expand(A, 1, -1), negs], dim=1)                 # (A, 1 + K, D)
        q = F.normalize(anchors, dim=-1)[:, None, :]                          # (A, 1, D): one group per anchor
        zero = torch.zeros(A, 1, dtype=torch.long, device=anchors.device)
        return grouped_info_nce(q, F.normalize(k, dim=-1), temperature=temperature, pos_index=zero,
                                impl=impl).loss
    k = torch.cat([proto[None], negs])
    zero = torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device)
    return info_nce(anchors, k, zero, temperature=temperature, impl=impl)


def arco_contrast(rep: torch.Tensor, teacher_rep: torch.Tensor, masks: ContrastMasks, bank: ClassMemoryBank,
                  sampler: str = "sg", num_anchors: int = 256, num_negatives: int = 512, temperature: float = 0.5,
                  grid=4, generator: Optional[torch.Generator] = None, impl: str = "auto",
                  update_bank: bool = True) -> Dict[str, torch.Tensor]:
    """L_contrast (module docstring): enqueue each class's negatives, then contrast its anchors.

    rep (B, D, *S) student (grad), teacher_rep (B, D, *S); sampler ∈ macl.semi.sampling.SAMPLERS or "all".
    Returns {"loss": 0-d, "classes": number of classes that contributed (0-d)}; the loss is 0 (with a zero
    gradient into rep) when fewer than two classes are present or none contributed.
    """
    teacher_rep = teacher_rep.detach()
    K = len(masks.valid)
    if update_bank:
        for c in range(K):
            feats, coords = pixels(teacher_rep, masks.negatives[c])
            bank.push(c, feats, coords)
    present = [c for c in range(K) if bool(masks.valid[c].any())]
    zero = rep.sum() * 0.0
    if len(present) <= 1:
        return {"loss": zero, "classes": torch.tensor(0)}
    total, used = zero, 0
    for c in present:
        if not bool(masks.anchors[c].any()) or int(bank.count[c]) == 0:
            continue
        proto = pixels(teacher_rep, masks.valid[c])[0].mean(0)
        anchors, a_coords = pixels(rep, masks.anchors[c])
        neg, n_coords = bank.get(c)
        neg = neg.to(rep.dtype)
        if sampler == "all":
            total = total + prototype_contrast(anchors, proto, neg, temperature, impl)
        else:
            rep_kw = dict(replacement=True) if sampler == "ns" else {}
            a = sample(sampler, a_coords, num_anchors, grid, generator, **rep_kw).index
            n = sample(sampler, n_coords, num_anchors * num_negatives, grid, generator, **rep_kw).index
            n = n[torch.randperm(n.numel(), generator=generator, device="cpu").to(n.device)]
            A = a.numel()
            negs = neg[n[:A * num_negatives]].reshape(A, num_negatives, -1)
            total = total + prototype_contrast(anchors[a], proto, negs, temperature, impl)
        used += 1
    if used == 0:
        return {"loss": zero, "classes": torch.tensor(0)}
    return {"loss": total / used, "classes": torch.tensor(used)}


# ------------------------------------------------------------------------------------------ other terms
def unsup_loss(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor,
               strong_threshold: float = 0.97) -> torch.Tensor:
    """Confidence-weighted pseudo-label CE: mean over pixels of w_b·CE(logits, pseudo), w_b = the fraction of
    image b's pixels whose teacher confidence ≥ strong_threshold. logits (B, K, *S); pseudo, confidence (B, *S)."""
    B = logits.shape[0]
    w = (confidence.reshape(B, -1) >= strong_threshold).float().mean(1)
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    return (w.view(-1, *([1] * (ce.dim() - 1))) * ce).mean()


class NNPool(nn.Module):
    """FIFO of `size` L2-normalised flattened teacher maps (size, D·|S|); starts as normalised noise."""

    def __init__(self, size: int, width: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.register_buffer("pool", F.normalize(torch.randn(size, width, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, maps: torch.Tensor) -> None:
        flat = F.normalize(maps.detach().reshape(maps.shape[0], -1).to(self.pool), dim=1)
        n, size = flat.shape[0], self.pool.shape[0]
        idx = (torch.arange(n, device=flat.device) + int(self.ptr)) % size
        self.pool[idx] = flat[-size:] if n > size else flat
        self.ptr.fill_((int(self.ptr) + n) % size)


def nn_term(student_map: torch.Tensor, teacher_map: torch.Tensor, pool: NNPool, topk: int = 5,
            mode: str = "public") -> torch.Tensor:
    """The nearest-neighbour term over the pool (module docstring). maps (B, D, *S). Returns a 0-d tensor:
    "public": its value carries no gradient; "student": differentiable w.r.t. student_map; "off": 0."""
    if mode not in NN_MODES:
        raise ValueError(f"nn mode must be one of {NN_MODES}, got {mode!r}")
    if mode == "off":
        return student_map.sum() * 0.0
    s = F.normalize(student_map.reshape(student_map.shape[0], -1), dim=1)
    t = F.normalize(teacher_map.detach().reshape(teacher_map.shape[0], -1), dim=1)
    bank = pool.pool.to(s.dtype)
    k = min(topk, bank.shape[0])
    if mode == "public":
        with torch.no_grad():
            dist_s = 2 - 2 * s @ bank.T
            dist_t = 2 - 2 * t @ bank.T
            idx = dist_s.topk(k, dim=1, largest=False).indices
            return torch.gather(dist_t, 1, idx).mean()
    idx = (2 - 2 * t @ bank.T).topk(k, dim=1, largest=False).indices
    return torch.gather(2 - 2 * s @ bank.T, 1, idx).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float = 0.99) -> None:
    """teacher ← m·teacher + (1 − m)·student for every floating-point parameter and buffer; other buffers
    (e.g. BatchNorm's num_batches_tracked) are copied."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, t in t_state.items():
        s = s_state[name]
        if t.is_floating_point():
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)
