"""Negatives from every rank of a torch.distributed job (docs/distributed.md).

Open `gather.py` first: gathering with gradient, the per-call plan, communication records. `core.py` runs the
core operation across ranks (every loss's `process_group=` lands there).
"""
from .gather import (CommRecord, GatherPlan, all_reduce_sum, gather_metadata, gather_with_grad, global_offset, group_rank,
                     record_communication, resolve_group, world_size)

__all__ = ["gather_with_grad", "gather_metadata", "global_offset", "GatherPlan", "resolve_group", "record_communication",
           "CommRecord", "all_reduce_sum", "world_size", "group_rank"]
