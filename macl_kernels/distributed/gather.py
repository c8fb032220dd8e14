"""Cross-device negatives over torch.distributed: gather with gradient, metadata gathers, global offsets.

The scheme is OpenCLIP's "local loss + gather with gradient":

- forward: every rank all-gathers the keys (and their labels / positions / masks), so each rank sees the
  global key set of M = Σ_r M_r rows, while it keeps only its own N_r anchors;
- backward: every rank holds a gradient for all M gathered rows (its own anchors' contribution); these are
  summed over ranks and each rank gets back the slice of its own rows (a reduce-scatter).

Ranks may hold different numbers of rows: a small header all-gather (rows, D, dtype, which optional
metadata is present) precedes every gather, and the rows are padded to the largest rank for the collective
and stripped again afterwards. The same header catches ranks that disagree on D, dtype or metadata, and
raises the same error on every rank (no rank is left waiting in a collective).

Layout of a gather: rank order (rank 0's rows, then rank 1's, ...), or `own_first`: this rank's rows first,
then the others in rank order after it (r, r+1, ..., W−1, 0, ..., r−1). The losses use `own_first`, so that
a local anchor i and its own key i keep the same index: `exclude_self` and local positive indices work on
the gathered keys unchanged (the loss is a sum over keys, so the order of the keys does not change it).

`record_communication()` counts the bytes every collective here sends (see `CommRecord`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

GroupArg = Union[None, str, "dist.ProcessGroup"]

#: dtype ↔ code in the header all-gather (so ranks can compare dtypes with one small integer tensor)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool)
_MAX_DIMS = 6

# torch ≥ 2.13 names the flat-buffer collectives *_single (the *_tensor names warn); torch 2.4 has only *_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_group(process_group: GroupArg):
    """The process group a loss gathers over, or None for no distribution.

    Args:
        process_group: None (single-process loss), "world" (the default group: every rank), or a
            `torch.distributed.ProcessGroup` (e.g. from `dist.new_group`).

    Raises:
        RuntimeError: a group is asked for but torch.distributed is unavailable or not initialised.
        ValueError: an unknown string, or this process is not a member of the group.
        TypeError: anything else.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str) and process_group != "world":
        raise ValueError(f"process_group must be None, 'world' or a torch.distributed.ProcessGroup, "
                         f"got {process_group!r}")
    if not isinstance(process_group, str) and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None, 'world' or a torch.distributed.ProcessGroup, "
                        f"got {type(process_group).__name__}")
    if not dist.is_available():
        raise RuntimeError("global negatives (process_group=...) need torch.distributed, which this PyTorch "
                           "build does not provide")
    if not dist.is_initialized():
        raise RuntimeError(
            f"global negatives were asked for (process_group={process_group!r}) but the default process "
            f"group is not initialised: call torch.distributed.init_process_group(...) first (torchrun sets "
            f"the environment for it), or pass process_group=None for a single-process loss")
    group = dist.group.WORLD if process_group == "world" else process_group
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process_group "
                         f"it was given")
    return group


def world_size(group=None) -> int:
    """Number of ranks in `group` (1 when group is None: no distribution)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group=None) -> int:
    """This process's rank within `group` (0 when group is None: no distribution)."""
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------------------- communication record

@dataclass
class CommRecord:
    """Bytes sent by this rank in the collectives of `macl_kernels.distributed`, counted from tensor sizes
    with the bandwidth-optimal (ring) algorithms NCCL uses: all-gather and reduce-scatter of a W·n-row
    buffer send (W − 1)·n rows per rank; an all-reduce of b bytes sends 2·(W − 1)/W·b.
    (Gloo emulates reduce-scatter with an all-reduce, which sends twice the reduce-scatter's bytes.)"""
    calls: list = field(default_factory=list)   # (op, what, bytes sent by this rank)

    def add(self, op: str, what: str, nbytes: float) -> None:
        self.calls.append((op, what, float(nbytes)))

    def total(self, op: Optional[str] = None) -> float:
        return sum(b for o, _, b in self.calls if op is None or o == op)


_RECORDS: list[CommRecord] = []


@contextlib.contextmanager
def record_communication() -> Iterator[CommRecord]:
    """Context manager: counts the bytes this rank sends in the collectives below (forward and backward)."""
    rec = CommRecord()
    _RECORDS.append(rec)
    try:
        yield rec
    finally:
        _RECORDS.remove(rec)


def _record(op: str, what: str, nbytes: float) -> None:
    for rec in _RECORDS:
        rec.add(op, what, nbytes)


# ---------------------------------------------------------------------------------------- the plan

def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "an unsupported dtype"


@dataclass(frozen=True)
class GatherPlan:
    """How the rows of one tensor are spread over the ranks of `group`: `sizes[r]` rows on rank r along `dim`.

    Made by `GatherPlan.exchange` (one small all-gather); then `gather` moves any tensor laid out the same way
    (features, labels, positions, masks: `sizes[rank]` rows along `dim`) with no further header.
    """
    group: object
    rank: int
    sizes: tuple
    dim: int

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        """Global row count Σ_r sizes[r]."""
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the rank-ordered concatenation (the global batch)."""
        return sum(self.sizes[:self.rank])

    def order(self, own_first: bool) -> list[int]:
        """The ranks in the order their rows appear in a gather."""
        if not own_first:
            return list(range(self.world))
        return [(self.rank + i) % self.world for i in range(self.world)]

    @classmethod
    def exchange(cls, x: torch.Tensor, group=None, *, dim: int = 0, flags: Optional[dict] = None,
                 error: Optional[BaseException] = None) -> "GatherPlan":
        """All-gather (rows along `dim`, the other dims, dtype, flags) and check the ranks agree.

        Args:
            x: this rank's tensor; every rank must pass the same shape except along `dim`, and the same dtype.
            group: a ProcessGroup (None: the default group).
            dim: the row dimension (may be negative).
            flags: name → bool, e.g. {"mask": mask is not None}; every rank must agree on each.
            error: an exception this rank met while checking its own inputs. It is raised here, after the
                header exchange, and the other ranks raise a RuntimeError naming this rank, so that no rank
                is left waiting in a collective the failing rank never joins.

        Raises:
            ValueError: ranks disagree on the number of dimensions, a dimension other than `dim` (e.g. the
                feature dimension D), or a flag. TypeError: ranks disagree on the dtype. Every rank raises.
            RuntimeError: another rank failed its own input checks. `error` itself, on the rank that had it.
        """
        flags = dict(flags or {})
        if x.dim() > _MAX_DIMS:
            raise ValueError(f"can gather tensors of at most {_MAX_DIMS} dimensions, got shape {tuple(x.shape)}")
        d = dim % x.dim()
        shape = list(x.shape) + [-1] * (_MAX_DIMS - x.dim())
        header = torch.tensor([x.dim(), d, _dtype_code(x.dtype)] + shape + [int(bool(v)) for v in flags.values()]
                              + [int(error is None)], dtype=torch.int64, device=x.device)
        W = dist.get_world_size(group)
        all_h = header.new_empty(W * header.numel())
        _all_gather_flat(all_h, header, group=group)
        _record("all_gather", "header", (W - 1) * header.numel() * 8)
        rows = all_h.view(W, -1).tolist()
        if error is not None:
            raise error
        failed = [r for r, row in enumerate(rows) if not row[-1]]
        if failed:
            raise RuntimeError(f"rank(s) {failed} of the process group rejected their inputs to the distributed "
                               f"loss (see the error raised there); this rank stops too")
        _check_agreement(rows, d, flags)
        return cls(group=group, rank=dist.get_rank(group), sizes=tuple(r[3 + d] for r in rows), dim=d)

    def gather(self, t: torch.Tensor, *, own_first: bool = False, with_grad: Optional[bool] = None,
               what: str = "tensor") -> torch.Tensor:
        """Concatenate every rank's `t` along the plan's dim (rank order, or this rank's rows first).

        with_grad: None → differentiable iff t requires grad (and grad mode is on). A differentiable
        gather's backward returns this rank's rows of the gradient summed over ranks (reduce-scatter).
        bool tensors are sent as uint8. Raises ValueError if t does not have `sizes[rank]` rows.
        """
        if t.shape[self.dim] != self.sizes[self.rank]:
            raise ValueError(f"{what} has {t.shape[self.dim]} rows along dim {self.dim} on rank {self.rank}, "
                             f"but the gather was planned for {self.sizes[self.rank]}")
        if with_grad is None:
            with_grad = t.requires_grad and torch.is_grad_enabled()
        if with_grad:
            return _GatherWithGrad.apply(t, self, own_first, what)
        return _gather_rows(self, t.detach(), own_first, what)


def _check_agreement(rows: list, d: int, flags: dict) -> None:
    def disagree(values) -> bool:
        return len(set(values)) > 1

    listing = lambda vals: ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals))
    ndims = [r[0] for r in rows]
    if disagree(ndims) or disagree([r[1] for r in rows]):
        raise ValueError(f"ranks disagree on the number of dimensions of the gathered tensor ({listing(ndims)})")
    nd = ndims[0]
    for axis in range(nd):
        if axis == d:
            continue
        vals = [r[3 + axis] for r in rows]
        if disagree(vals):
            name = "the feature dimension D" if axis == nd - 1 else f"dimension {axis}"
            shapes = listing([tuple(r[3 + a] for a in range(nd)) for r in rows])
            raise ValueError(f"ranks disagree on {name} ({listing(vals)}; shapes {shapes}): every rank must "
                             f"pass the same D and dtype; only the number of rows (dim {d}) may differ")
    codes = [r[2] for r in rows]
    if disagree(codes):
        raise TypeError(f"ranks disagree on the dtype of the gathered tensor "
                        f"({listing([_dtype_name(c) for c in codes])}): every rank must pass the same dtype")
    for i, name in enumerate(flags):
        vals = [bool(r[3 + _MAX_DIMS + i]) for r in rows]
        if disagree(vals):
            raise ValueError(f"ranks disagree on whether {name} is given ({listing(vals)})")


# -------------------------------------------------------------------------------------- collectives

def _gather_rows(plan: GatherPlan, t: torch.Tensor, own_first: bool, what: str) -> torch.Tensor:
    """Forward of the gather, no autograd. Equal sizes: all-gather straight into the output's row slots;
    unequal sizes: pad to the largest rank, all-gather, strip the padding."""
    is_bool = t.dtype == torch.bool
    x = t.movedim(plan.dim, 0).contiguous()
    if is_bool:
        x = x.to(torch.uint8)
    W, n_max, rest = plan.world, max(plan.sizes), x.shape[1:]
    order = plan.order(own_first)
    _record("all_gather", what, (W - 1) * n_max * rest.numel() * x.element_size())
    out = x.new_empty((plan.total,) + rest)
    if len(set(plan.sizes)) == 1:
        slots, start = [None] * W, 0
        for r in order:
            slots[r] = out[start:start + n_max]
            start += n_max
        dist.all_gather(slots, x, group=plan.group)
    else:
        send = x if x.shape[0] == n_max else torch.cat([x, x.new_zeros((n_max - x.shape[0],) + rest)])
        buf = x.new_empty((W * n_max,) + rest)
        _all_gather_flat(buf, send, group=plan.group)
        start = 0
        for r in order:
            out[start:start + plan.sizes[r]] = buf[r * n_max:r * n_max + plan.sizes[r]]
            start += plan.sizes[r]
        del buf
    if is_bool:
        out = out.bool()
    return out.movedim(0, plan.dim)


def _reduce_scatter_rows(plan: GatherPlan, grad: torch.Tensor, own_first: bool, what: str) -> torch.Tensor:
    """Backward of the gather: Σ over ranks of the gradient rows that belong to this rank."""
    g = grad.movedim(plan.dim, 0)
    W, n_max, rest = plan.world, max(plan.sizes), g.shape[1:]
    order = plan.order(own_first)
    if len(set(plan.sizes)) == 1 and not own_first:
        buf = g.contiguous()
    else:   # rank order, each rank's block padded to n_max rows
        buf = g.new_zeros((W * n_max,) + rest)
        start = 0
        for r in order:
            buf[r * n_max:r * n_max + plan.sizes[r]] = g[start:start + plan.sizes[r]]
            start += plan.sizes[r]
    out = g.new_empty((n_max,) + rest)
    _record("reduce_scatter", what, (W - 1) * n_max * rest.numel() * g.element_size())
    _reduce_scatter_flat(out, buf, op=dist.ReduceOp.SUM, group=plan.group)
    return out[:plan.sizes[plan.rank]].movedim(0, plan.dim)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, plan, own_first, what):
        ctx.plan, ctx.own_first, ctx.what = plan, own_first, what
        return _gather_rows(plan, t, own_first, what)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(ctx.plan, grad, ctx.own_first, ctx.what), None, None, None


# -------------------------------------------------------------------------------------- public helpers

def gather_with_grad(x: torch.Tensor, group=None, *, dim: int = 0, own_first: bool = False) -> torch.Tensor:
    """All-gather `x` from every rank of `group`, differentiably.

    Forward: the concatenation of every rank's x along `dim` (rank order; with own_first, this rank's rows
    first). Backward: the gradient of the gathered tensor is summed over ranks and each rank receives the
    rows of its own x (reduce-scatter). So if every rank r computes a loss L_r from the gathered tensor,
    x.grad on rank r is ∂(Σ_r' L_r')/∂x_r.

    Args:
        x: (…, n_r, …) with n_r rows along `dim` on rank r (may differ between ranks); same dtype and other
            dims on every rank. group: a ProcessGroup, "world", or None (the default group).

    Returns:
        (…, Σ_r n_r, …) tensor of x's dtype and device.

    Raises:
        RuntimeError: torch.distributed not initialised. ValueError / TypeError: ranks disagree on the
        shape (other than `dim`) or on the dtype (raised on every rank).
    """
    group = resolve_group("world" if group is None else group)
    plan = GatherPlan.exchange(x, group, dim=dim)
    return plan.gather(x, own_first=own_first, with_grad=True, what="features")


def gather_metadata(t: torch.Tensor, group=None, *, dim: int = 0, own_first: bool = False) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (labels, positions, bool masks), as `gather_with_grad`
    but detached. Same arguments, returns and errors."""
    group = resolve_group("world" if group is None else group)
    plan = GatherPlan.exchange(t, group, dim=dim)
    return plan.gather(t, own_first=own_first, with_grad=False, what="metadata")


def global_offset(n_local: int, group=None) -> tuple[int, int]:
    """(offset, total): the index of this rank's first row in the rank-ordered global batch, and the global
    row count, when rank r holds `n_local` rows. One small all-gather. Raises RuntimeError if torch.distributed
    is not initialised."""
    group = resolve_group("world" if group is None else group)
    sizes = torch.tensor([int(n_local)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        sizes = sizes.cuda()
    out = sizes.new_empty(dist.get_world_size(group))
    _all_gather_flat(out, sizes, group=group)
    counts = out.tolist()
    rank = dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def all_reduce_sum(t: torch.Tensor, group, what: str = "count") -> torch.Tensor:
    """Σ over ranks of a small tensor (returned; the input is not modified). No gradient."""
    out = t.detach().clone()
    _record("all_reduce", what, 2 * (dist.get_world_size(group) - 1) / dist.get_world_size(group)
            * out.numel() * out.element_size())
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
