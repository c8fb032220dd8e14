"""Adapters for the losses users have today, mapped onto macl_kernels' conventions.

Each adapter takes the same raw features as our loss and returns the same value (checked on a small input
before any timing, see `benchmarks.runner`). Conventions, all verified numerically against
macl_kernels' float64 reference:
- MONAI `ContrastiveLoss(temperature=τ)(z1, z2)`: SimCLR over the 2B embeddings with cosine similarity,
  self excluded from the denominator, mean over 2B anchors  ==  nt_xent(z1, z2, temperature=τ).
  Its "batch" is B (pairs): batch 1024 means 2048 embeddings.
- lightly `NTXentLoss(temperature=τ, memory_bank_size=0)(z1, z2)`: the same (it normalises itself).
- pytorch-metric-learning `NTXentLoss(temperature=τ)(cat(z1, z2), cat(arange(B), arange(B)))`: each of the
  2B positive pairs against the 2B − 2 other-label embeddings, mean over pairs (cosine similarity by
  default)  ==  nt_xent.
- pytorch-metric-learning `SupConLoss(temperature=τ)(flat, labels)` with the (B, V, C) features laid out
  view-major (as sup_con does), mean over anchors that have a positive  ==  sup_con (no τ/τ_base rescale).

The peers live in the separate environment made by `benchmarks/make_peers_env.sh` (lightly needs a
torchvision that matches torch); elsewhere `peer_unavailable_reason` says why a peer cannot run.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

#: impl name -> (module to import, losses it implements)
PEERS = {
    "monai": ("monai.losses", ("nt_xent",)),
    "lightly": ("lightly.loss", ("nt_xent",)),
    "pml": ("pytorch_metric_learning.losses", ("nt_xent", "sup_con")),
}


def peer_unavailable_reason(impl: str) -> Optional[str]:
    """None when the peer's package imports here, else why not (one line). Never raises."""
    try:
        importlib.import_module(PEERS[impl][0])
    except Exception as e:  # ImportError, or a broken install (torchvision beside the wrong torch)
        return f"{PEERS[impl][0]} not importable here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); " \
               f"use the peers environment (benchmarks/make_peers_env.sh)"
    return None


def peer_version(impl: str) -> str:
    """The peer package's version, or '' when it is not importable."""
    dist = {"monai": "monai", "lightly": "lightly", "pml": "pytorch_metric_learning"}[impl]
    try:
        return str(importlib.import_module(dist).__version__)
    except Exception:
        return ""


def peer_fn(impl: str, loss: str, tau: float):
    """A callable (the same arguments as our loss's adapter in cases.py) computing `loss` with the peer."""
    if impl == "monai" and loss == "nt_xent":
        from monai.losses import ContrastiveLoss
        mod = ContrastiveLoss(temperature=tau)
        return lambda z1, z2: mod(z1, z2)
    if impl == "lightly" and loss == "nt_xent":
        from lightly.loss import NTXentLoss
        mod = NTXentLoss(temperature=tau, memory_bank_size=0)
        return lambda z1, z2: mod(z1, z2)
    if impl == "pml" and loss == "nt_xent":
        from pytorch_metric_learning.losses import NTXentLoss
        mod = NTXentLoss(temperature=tau)

        def pml_nt_xent(z1, z2):
            B = z1.shape[0]
            lab = torch.arange(B, device=z1.device).repeat(2)
            return mod(torch.cat([z1, z2]), lab)
        return pml_nt_xent
    if impl == "pml" and loss == "sup_con":
        from pytorch_metric_learning.losses import SupConLoss
        mod = SupConLoss(temperature=tau)

        def pml_sup_con(features, labels):
            B, V, C = features.shape
            return mod(features.transpose(0, 1).reshape(V * B, C), labels.repeat(V))
        return pml_sup_con
    raise ValueError(f"peer {impl!r} does not implement {loss!r}")
