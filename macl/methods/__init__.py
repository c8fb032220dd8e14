"""Pre-training methods: each turns a `Batch` into named loss terms (MACL, PCL, SimCLR, GCL-style).

Open `base.py` first (the `Method` contract and registry), then `macl.py`; ARCO lives in `macl.semi`.
"""
from .base import METHODS, Batch, Method, build_method, register_method, select_positions
from .gcl import GCL, GCLModel
from .gcl_mitigator import mitigate, pcgrad
from .macl import MACL, dense_loss, equivariance_loss, global_loss
from .pcl import PCL
from .simclr import SimCLR

__all__ = ["Batch", "Method", "METHODS", "build_method", "register_method", "select_positions",
           "MACL", "PCL", "SimCLR", "GCL", "GCLModel", "mitigate", "pcgrad", "global_loss", "dense_loss", "equivariance_loss"]
