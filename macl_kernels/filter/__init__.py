"""The GCL-style Gradient Filter: a contrastive loss whose gradient keeps only the hardest fraction ρ of negatives.

Open `filtered.py` first (the algorithm and `filtered_info_nce`); `select.py` and `bracket.py` choose the kept
pairs, `backward.py` is the gradient, `chunk_loops.py` the per-chunk loops scripted to run without the GIL.
"""
from .filtered import FilteredResult, filtered_info_nce

__all__ = ["filtered_info_nce", "FilteredResult"]
