"""Fused, memory-bounded contrastive losses (InfoNCE family) for PyTorch.

    from macl_kernels import nt_xent, sup_con, positional_sup_con, info_nce, dense_info_nce

Every loss is one call of the core operation `grouped_info_nce` (KERNELS.md), computed by one of three
implementations chosen with `impl=`: "reference" (naive), "torch" (chunked, any device), "triton"
(fused GPU kernels); "auto" picks triton for CUDA tensors where Triton can launch, torch otherwise.
Every loss takes `process_group=` for negatives from every rank of a torch.distributed job (docs/distributed.md).
"""
from .api import ContrastResult, grouped_info_nce, resolve_impl
from .distributed import (GatherPlan, gather_metadata, gather_with_grad, global_offset, record_communication,
                          resolve_group)
from .losses import (DenseInfoNCELoss, InfoNCELoss, NTXentLoss, PositionalSupConLoss, SupConLoss,
                     dense_info_nce, info_nce, nt_xent, positional_sup_con, sup_con)

__all__ = [
    "grouped_info_nce", "ContrastResult", "resolve_impl",
    "info_nce", "nt_xent", "sup_con", "positional_sup_con", "dense_info_nce",
    "InfoNCELoss", "NTXentLoss", "SupConLoss", "PositionalSupConLoss", "DenseInfoNCELoss",
    "gather_with_grad", "gather_metadata", "global_offset", "GatherPlan", "resolve_group", "record_communication",
]
from macl import __version__  # noqa: E402  one version source (macl/__init__.py); macl imports only stdlib
