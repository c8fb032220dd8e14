"""What researchers write today: naive PyTorch for each loss, and transcriptions of public code.

Every function here materialises the full similarity matrix (that is the point: it is the baseline).
Inputs are the raw features of `benchmarks.cases.make_inputs`; each function normalises them itself, as
the losses in macl_kernels do with normalize=True, and uses the same temperature τ.

- `naive_*`: the straightforward PyTorch a user writes (one matmul, masks, cross-entropy / log-softmax).
- `pcl_sup_con`: a transcription of the public PCL code's loss (Zeng et al. 2021, a SupCon variant whose
  positives are slices closer than a threshold): cosine similarity by broadcasting (B·V, 1, C) against
  (1, B·V, C), so it holds an N×N×C tensor, an N×N positive mask tiled per view, exp, log, masked mean.
  With base_temperature = temperature (no rescale), as in macl_kernels.positional_sup_con.
- `macl_location_loop`: the public MACL code's location term: a Python loop over the H·W locations, each
  calling `pcl_sup_con` on the two views' features at that location, averaged over locations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_softmax_rows(logits: torch.Tensor, self_mask: torch.Tensor) -> torch.Tensor:
    """log p_ij = z_ij − log Σ_{k≠i} exp(z_ik) (diagonal excluded from the denominator, still finite)."""
    lse = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=-1, keepdim=True)
    return logits - lse


def _masked_sup_con(f: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    """SupCon L_out on normalised f (..., N, C) with positive mask pos (..., N, N), self excluded."""
    logits = f @ f.transpose(-1, -2) / tau
    n = f.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    pos = pos & ~eye
    log_prob = _log_softmax_rows(logits, eye)
    per_anchor = -(log_prob * pos).sum(-1) / pos.sum(-1).clamp(min=1)
    return per_anchor.mean()


def naive_info_nce(q, k, tau):
    """F.cross_entropy(q̂ k̂ᵀ / τ, arange(N))."""
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).t() / tau
    return F.cross_entropy(logits.float(), torch.arange(q.shape[0], device=q.device))


def naive_nt_xent(z1, z2, tau):
    """SimCLR: 2B normalised embeddings, self masked out, positive = the other view."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = (z @ z.t() / tau).float()
    eye = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = (torch.arange(2 * B, device=z.device) + B) % (2 * B)
    return F.cross_entropy(logits, target)


def naive_sup_con(features, labels, tau):
    """SupCon L_out over (B, V, C) features, view-major anchors, positives = same label."""
    B, V, C = features.shape
    f = F.normalize(features.transpose(0, 1).reshape(V * B, C), dim=-1).float()
    lab = labels.repeat(V)
    return _masked_sup_con(f, lab[:, None] == lab[None, :], tau)


def naive_positional_sup_con(features, positions, tau, threshold):
    """SupCon with positives |pos_i − pos_j| < threshold (matmul form)."""
    B, V, C = features.shape
    f = F.normalize(features.transpose(0, 1).reshape(V * B, C), dim=-1).float()
    p = positions.float().repeat(V)
    return _masked_sup_con(f, (p[:, None] - p[None, :]).abs() < threshold, tau)


def naive_dense_image(f1, f2, tau):
    """Voxel InfoNCE, negatives from the same image: (B, L, L) logits, cross-entropy per voxel."""
    B, C = f1.shape[:2]
    a = F.normalize(f1.reshape(B, C, -1), dim=1).transpose(1, 2)   # (B, L, C)
    b = F.normalize(f2.reshape(B, C, -1), dim=1)                   # (B, C, L)
    L = a.shape[1]
    logits = (torch.bmm(a, b) / tau).float()
    target = torch.arange(L, device=f1.device).repeat(B)
    return F.cross_entropy(logits.reshape(B * L, L), target)


def naive_macl_location(f1, f2, positions, tau, threshold):
    """MACL's location term vectorised over locations: (L, 2B, 2B) logits, positional SupCon per location."""
    B, C = f1.shape[:2]
    a = F.normalize(f1.reshape(B, C, -1), dim=1)
    b = F.normalize(f2.reshape(B, C, -1), dim=1)
    feats = torch.cat([a, b]).permute(2, 0, 1).float()            # (L, 2B, C)
    p = positions.float().repeat(2)
    return _masked_sup_con(feats, ((p[:, None] - p[None, :]).abs() < threshold)[None], tau)


# --------------------------------------------------------------------------- public code, transcribed

def pcl_sup_con(features, positions, tau, threshold):
    """The public PCL loss (contrast_mode 'all', positives |pos_i − pos_j| < threshold), transcribed.

    features (B, V, C) (not normalised: cosine similarity by broadcasting does it), positions (B,).
    """
    device = features.device
    B, V = features.shape[0], features.shape[1]
    lab = positions.contiguous().view(-1, 1)
    mask = (torch.abs(lab.T.repeat(B, 1) - lab.repeat(1, B)) < threshold).float().to(device)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)            # (V·B, C), view-major
    sim = F.cosine_similarity(contrast.unsqueeze(1), contrast.unsqueeze(0), dim=-1)   # N×N×C inside
    logits = sim / tau
    mask = mask.repeat(V, V)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(B * V, device=device).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-mean_log_prob_pos).view(V, B).mean()


def macl_location_loop(f1, f2, positions, tau, threshold):
    """The public MACL code's location term: for each location s, PCL's loss over [f1[:, :, s], f2[:, :, s]]."""
    B, C = f1.shape[:2]
    a, b = f1.reshape(B, C, -1), f2.reshape(B, C, -1)
    total = 0.0
    n_loc = a.shape[2]
    for s in range(n_loc):
        feats = torch.stack([a[:, :, s], b[:, :, s]], dim=1)            # (B, 2, C)
        total = total + pcl_sup_con(feats, positions, tau, threshold)
    return total / n_loc
