"""The Gradient Filter's per-chunk loops (`filter_bracket.Chunks`), run as TorchScript when it is available.

Each loop makes 2–3 operations per row chunk, 16 chunks per tile, several loops per tile. Run from Python,
every operation takes the GIL for its dispatch, so the filter's tile workers (`tile_workers.run`) wait on each
other (measured, N = M = 8192, 2 workers: forward 0.24 s with Python loops, 0.18 s scripted; one thread: no
difference). Scripted, a loop runs in the TorchScript interpreter, which does not hold the GIL.
`torch.jit.script` is deprecated in recent PyTorch: it is called once per loop, lazily, with its
DeprecationWarning silenced; where it fails or is absent the plain Python loop runs (the same operations in
the same order, so the same results).
"""
from __future__ import annotations

import threading
import warnings
from typing import List

import torch

#: False: always the Python loops
SCRIPTED = True


def count2(xs: List[torch.Tensor], bufs: List[torch.Tensor], c1: List[torch.Tensor], c2: List[torch.Tensor],
           o1: List[torch.Tensor], o2: List[torch.Tensor]):
    """o1[i] = Σ_j 1[xs[i] ≥ c1[i]], o2[i] likewise with c2 (row sums, via the 0/1 float buffer bufs[i])."""
    for i in range(len(xs)):
        torch.sum(torch.ge(xs[i], c1[i], out=bufs[i]), -1, out=o1[i])
        torch.sum(torch.ge(xs[i], c2[i], out=bufs[i]), -1, out=o2[i])


def exp_ge(xs: List[torch.Tensor], bufs: List[torch.Tensor], c: List[torch.Tensor]):
    """In place: xs[i] ← exp(xs[i])·1[xs[i] ≥ c[i]]."""
    for i in range(len(xs)):
        keep = torch.ge(xs[i], c[i], out=bufs[i])
        xs[i].exp_().mul_(keep)


def members(xs: List[torch.Tensor], b1: List[torch.Tensor], b2: List[torch.Tensor], hi: List[torch.Tensor],
            lo: List[torch.Tensor], masks: List[torch.Tensor], outs: List[torch.Tensor]):
    """outs[i] = Σ_j exp(x)·1[x ≥ hi]; masks[i] (bool) = 1[lo ≤ x < hi] (as 1[x ≥ lo] − 1[x ≥ hi])."""
    for i in range(len(xs)):
        above = torch.ge(xs[i], hi[i], out=b2[i])
        torch.sum(torch.exp(xs[i], out=b1[i]).mul_(above), -1, out=outs[i])
        masks[i].copy_(torch.ge(xs[i], lo[i], out=b1[i]).sub_(above))


_compiled: dict = {}
_lock = threading.Lock()


def get(fn):
    """The scripted form of one of this module's loops (made once), or fn itself."""
    if not SCRIPTED:
        return fn
    out = _compiled.get(fn)
    if out is None:
        with _lock:
            out = _compiled.get(fn)
            if out is None:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        out = torch.jit.script(fn)
                except Exception:   # no TorchScript in this build: the Python loop
                    out = fn
                _compiled[fn] = out
    return out
