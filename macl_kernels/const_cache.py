"""Small constant index tensors the losses would otherwise rebuild on every call, cached and trusted.

`nt_xent` contrasts 2B embeddings, each anchor's positive being the other view: pos_index_i = (i + B) mod 2B.
Building it costs two eager operations per call, and as a user-given pos_index it would be range-checked
(`aminmax` and a read back to the host) and compared with the anchor index (exclude_self) on every call; at
B = 64 such fixed costs are a large part of a call (docs/cpu_path.md). Here it is built once per (B, device) and
kept in a small LRU cache (at most `MAX_ENTRIES` tensors, so a run over many batch sizes never grows it without
bound). The cache also vouches for what it built: `trusted(t)` says that `t` IS one of its tensors and has not
been modified in place since (its version counter is unchanged), so the core may skip the checks for properties
that hold by construction (values in [0, 2B), never equal to the anchor's own index).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

MAX_ENTRIES = 16

_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


class Trust(NamedTuple):
    """What holds for every value of a trusted index tensor of shape (1, N)."""
    bound: int          # values lie in [0, bound)
    never_self: bool    # value_i != i for every i


_TRUST: "dict[int, tuple[torch.Tensor, int, Trust]]" = {}   # id -> (tensor, version at creation, trust)


def _put(key: tuple, t: torch.Tensor, trust: Trust) -> torch.Tensor:
    _CACHE[key] = t
    _TRUST[id(t)] = (t, t._version, trust)
    while len(_CACHE) > MAX_ENTRIES:
        _, old = _CACHE.popitem(last=False)
        _TRUST.pop(id(old), None)
    return t


def other_view_index(B: int, device: torch.device) -> torch.Tensor:
    """(1, 2B) int64 tensor on `device` with value (i + B) mod 2B at position i: the other view's row.

    Cached per (B, device); the same tensor object is returned while it stays in the cache. Callers must not
    modify it (an in-place change revokes its trust: `trusted` then returns None and the usual checks run).
    Raises ValueError for B < 0.
    """
    if B < 0:
        raise ValueError(f"B must be >= 0, got {B}")
    device = torch.device(device)
    key = ("other_view", B, device)
    t = _CACHE.get(key)
    if t is not None and trusted(t) is not None:
        _CACHE.move_to_end(key)
        return t
    n = 2 * B
    t = (torch.arange(B, B + n, device=device) % max(n, 1)).reshape(1, n)
    return _put(key, t, Trust(bound=n, never_self=B > 0))


def trusted(t: torch.Tensor) -> Optional[Trust]:
    """The `Trust` of `t` when it is a cached tensor not modified since it was built, else None."""
    entry = _TRUST.get(id(t))
    if entry is None or entry[0] is not t or entry[0]._version != entry[1]:
        return None
    return entry[2]


def clear() -> None:
    """Empty the cache (tests; freeing device memory)."""
    _CACHE.clear()
    _TRUST.clear()
