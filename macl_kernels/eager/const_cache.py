"""Small constant tensors the losses and the dense path would otherwise rebuild on every call, cached.

`nt_xent` contrasts 2B embeddings, each anchor's positive being the other view: pos_index_i = (i + B) mod 2B.
Building it costs two eager operations per call, and as a user-given pos_index it would be range-checked
(`aminmax` and a read back to the host) and compared with the anchor index (exclude_self) on every call; at
B = 64 such fixed costs are a large part of a call (docs/cpu_path.md). Here it is built once per (B, device) and
kept in a small LRU cache (at most `MAX_ENTRIES` tensors of every kind together, so a run over many batch sizes
never grows it without bound). The cache also vouches for what it built: `trusted(t)` says that `t` IS one of
its index tensors and has not been modified in place since (its version counter is unchanged), so the core may
skip the checks for properties that hold by construction (values in [0, 2B), never equal to the anchor's own
index). `filled` keeps small constant tensors (the dense backward's scatter source) the same way; a cached
tensor that was modified in place is rebuilt, never reused. While `torch.compile` traces, `other_view_index`
builds the index in the graph instead (no cache lookup, no version guard: nothing to break the graph on).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

MAX_ENTRIES = 16


class Trust(NamedTuple):
    """What holds for every value of a trusted index tensor of shape (1, N)."""
    bound: int          # values lie in [0, bound)
    never_self: bool    # value_i != i for every i


class _Entry(NamedTuple):
    tensor: torch.Tensor
    version: int
    trust: Optional[Trust]
    column: Optional[torch.Tensor]   # (1, N, 1) view of an index tensor (shares its version counter)


_CACHE: "OrderedDict[tuple, _Entry]" = OrderedDict()
_BY_ID: "dict[int, _Entry]" = {}   # id(tensor) -> its entry, for trusted() and column()


def _get(key: tuple) -> Optional[torch.Tensor]:
    e = _CACHE.get(key)
    if e is None or e.tensor._version != e.version:
        return None
    _CACHE.move_to_end(key)
    return e.tensor


def _put(key: tuple, t: torch.Tensor, trust: Optional[Trust] = None) -> torch.Tensor:
    old = _CACHE.pop(key, None)
    if old is not None:
        _BY_ID.pop(id(old.tensor), None)
    e = _Entry(t, t._version, trust, t.unsqueeze(-1) if trust is not None else None)
    _CACHE[key] = e
    _BY_ID[id(t)] = e
    while len(_CACHE) > MAX_ENTRIES:
        _, gone = _CACHE.popitem(last=False)
        _BY_ID.pop(id(gone.tensor), None)
    return t


def other_view_index(B: int, device: torch.device) -> torch.Tensor:
    """(1, 2B) int64 tensor on `device` with value (i + B) mod 2B at position i: the other view's row.

    Cached per (B, device); the same tensor object is returned while it stays in the cache. Callers must not
    modify it (an in-place change revokes its trust: `trusted` then returns None and the usual checks run).
    Raises ValueError for B < 0.
    """
    if B < 0:
        raise ValueError(f"B must be >= 0, got {B}")
    if torch.compiler.is_compiling():   # a graph constant: no cache, no version guard (never trusted)
        return (torch.arange(B, 3 * B, device=device) % max(2 * B, 1)).reshape(1, 2 * B)
    key = ("other_view", B, device)
    t = _get(key)
    if t is not None:
        return t
    n = 2 * B
    t = (torch.arange(B, B + n, device=device) % max(n, 1)).reshape(1, n)
    return _put(key, t, Trust(bound=n, never_self=B > 0))


def trusted(t: torch.Tensor) -> Optional[Trust]:
    """The `Trust` of `t` when it is a cached index tensor not modified since it was built, else None."""
    e = _BY_ID.get(id(t))
    if e is None or e.tensor is not t or e.trust is None or t._version != e.version:
        return None
    return e.trust


def column(t: torch.Tensor) -> torch.Tensor:
    """t.unsqueeze(-1), cached for a trusted index tensor (the dense path's gather / scatter index)."""
    e = _BY_ID.get(id(t))
    if e is None or e.tensor is not t or e.column is None or t._version != e.version:
        return t.unsqueeze(-1)
    return e.column


def filled(shape: tuple, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached tensor of `shape` filled with `value` (read it, never write it: a modified one is rebuilt)."""
    key = ("filled", tuple(shape), value, dtype, device)
    t = _get(key)
    if t is None:
        t = _put(key, torch.full(shape, value, dtype=dtype, device=device))
    return t


def clear() -> None:
    """Empty the cache (tests; freeing device memory)."""
    _CACHE.clear()
    _BY_ID.clear()
