"""The cases of tests/test_distributed.py and the worker that runs them on every rank of a gloo group.

Each case gives every rank its own inputs (seeded by case and rank; ranks may hold different batch sizes).
The worker computes the distributed loss and the gradients of its rank's inputs and saves them; the test
compares them with the single-process loss over the concatenated batch, computed in the test process from
the same seeds (`global_inputs`).
"""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

from macl_kernels import (dense_info_nce, info_nce, nt_xent, positional_sup_con, record_communication, sup_con)

LOSSES = dict(nt_xent=nt_xent, sup_con=sup_con, positional_sup_con=positional_sup_con,
              dense_info_nce=dense_info_nce, info_nce=info_nce)
D = 5
#: name → (loss, layout, per-rank sizes, loss keyword arguments, dtype)
CASES = {
    "nt_xent": ("nt_xent", "pair", (3, 3), {}, torch.float64),
    "nt_xent_unequal": ("nt_xent", "pair", (2, 4), {}, torch.float64),
    "nt_xent_sum": ("nt_xent", "pair", (2, 3), dict(reduction="sum"), torch.float64),
    "nt_xent_float32": ("nt_xent", "pair", (4, 3), dict(impl="auto"), torch.float32),
    "nt_xent_reference": ("nt_xent", "pair", (2, 3), dict(impl="reference"), torch.float64),
    "sup_con_views": ("sup_con", "views", (3, 5), {}, torch.float64),
    "sup_con_flat_none": ("sup_con", "flat", (4, 3), dict(reduction="none"), torch.float64),
    "sup_con_learned_tau": ("sup_con", "views", (2, 3), dict(temperature="learned"), torch.float64),
    "positional_sup_con": ("positional_sup_con", "views_pos", (3, 4), dict(threshold=0.3), torch.float64),
    "dense_batch": ("dense_info_nce", "dense", (1, 2), dict(negatives="batch"), torch.float64),
    "dense_batch_equal": ("dense_info_nce", "dense", (2, 2), dict(negatives="batch"), torch.float64),
    "dense_batch_symmetric": ("dense_info_nce", "dense", (2, 1), dict(negatives="batch", symmetric=True),
                              torch.float64),
    "dense_batch_none": ("dense_info_nce", "dense", (1, 2), dict(negatives="batch", reduction="none"),
                         torch.float64),
    "dense_image": ("dense_info_nce", "dense", (2, 1), dict(negatives="image"), torch.float64),
    "dense_location": ("dense_info_nce", "dense_pos", (2, 3), dict(negatives="location", threshold=0.3),
                       torch.float64),
    "dense_location_ids": ("dense_info_nce", "dense", (1, 2), dict(negatives="location"), torch.float64),
    "info_nce": ("info_nce", "info", ((3, 5), (2, 4)), {}, torch.float64),
}
TAU0 = 0.2


def rank_inputs(name: str, rank: int) -> dict:
    """Rank `rank`'s inputs of case `name` (leaf float tensors first; fresh tensors at every call)."""
    loss, layout, sizes, kw, dtype = CASES[name]
    g = torch.Generator().manual_seed(1000 * list(CASES).index(name) + rank)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    n = sizes[rank]
    if layout == "pair":
        return dict(z1=rnd(n, D), z2=rnd(n, D))
    if layout in ("views", "views_pos"):
        feats = rnd(n, 2, D)
        if layout == "views":
            return dict(features=feats, labels=torch.randint(0, 3, (n,), generator=g))
        return dict(features=feats, positions=torch.rand(n, generator=g, dtype=dtype))
    if layout == "flat":
        return dict(features=rnd(n, D), labels=torch.randint(0, 3, (n,), generator=g))
    if layout in ("dense", "dense_pos"):
        out = dict(f1=rnd(n, D, 3, 2), f2=rnd(n, D, 3, 2), mask=torch.rand(n, 3, 2, generator=g) > 0.3)
        if layout == "dense_pos":
            out["positions"] = torch.rand(n, generator=g, dtype=dtype)
        return out
    nq, nk = n
    return dict(query=rnd(nq, D), keys=rnd(nk, D), pos_index=torch.randint(0, nk, (nq,), generator=g))


def global_inputs(name: str, world: int) -> dict:
    """The concatenated batch of every rank's inputs: the single-process equivalent."""
    parts = [rank_inputs(name, r) for r in range(world)]
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if "pos_index" in out:   # each rank's positive indexes its own keys: shift by the rank's key offset
        offsets = torch.tensor([0] + [p["keys"].shape[0] for p in parts[:-1]]).cumsum(0)
        out["pos_index"] = torch.cat([p["pos_index"] + o for p, o in zip(parts, offsets)])
    return out


def loss_kwargs(name: str):
    """(keyword arguments, learnable temperature tensor or None)."""
    kw = dict(CASES[name][3])
    kw.setdefault("impl", "torch")
    tau = None
    if kw.get("temperature") == "learned":
        tau = torch.tensor(TAU0, dtype=torch.float64, requires_grad=True)
        kw["temperature"] = tau
    return kw, tau


def run_case(name: str, inputs: dict, process_group) -> dict:
    """Loss, per-input gradients (of the loss, or of its sum for reduction="none") and τ's gradient."""
    kw, tau = loss_kwargs(name)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v.is_floating_point() and k != "positions"}
    if process_group is not None:
        kw["process_group"] = process_group
    loss = LOSSES[CASES[name][0]](**inputs, **kw)
    loss.sum().backward()
    return dict(loss=loss.detach(), grads={k: v.grad for k, v in leaves.items()},
                tau_grad=None if tau is None else tau.grad)


def _ddp_case(rank: int, world: int) -> dict:
    """A shared linear layer under DistributedDataParallel: its averaged gradient and the loss."""
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(7)
    model = torch.nn.Linear(4, D).double()
    ddp = DistributedDataParallel(model)
    x = ddp_inputs(rank)
    B = x.shape[0] // 2
    z = ddp(x)
    loss = nt_xent(z[:B], z[B:], process_group="world", impl="torch")
    loss.backward()
    return dict(loss=loss.detach(), weight_grad=model.weight.grad.clone(), bias_grad=model.bias.grad.clone())


def ddp_inputs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(99 + rank)
    return torch.randn(2 * (2 + rank), 4, generator=g, dtype=torch.float64)   # (2B_r, 4): both views


def _catch(fn) -> str:
    try:
        fn()
    except Exception as e:   # recorded and checked by the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def _error_cases(rank: int) -> dict:
    z = torch.randn(3, D)
    out = {}
    # ranks disagree on D
    out["D"] = _catch(lambda: nt_xent(torch.randn(3, D + rank), torch.randn(3, D + rank), process_group="world"))
    # ranks disagree on the dtype
    dt = torch.float32 if rank == 0 else torch.float64
    out["dtype"] = _catch(lambda: nt_xent(z.to(dt), z.to(dt), process_group="world", impl="torch"))
    # a mask on one rank only
    f = torch.randn(1, D, 2, 2)
    m = torch.ones(1, 2, 2, dtype=torch.bool) if rank == 0 else None
    out["mask"] = _catch(lambda: dense_info_nce(f, f, m, negatives="batch", process_group="world"))
    # rank 1 passes float labels (the core rejects them): it raises its TypeError, rank 0 does not hang
    labels = torch.zeros(3, dtype=torch.long if rank == 0 else torch.float32)
    out["local"] = _catch(lambda: sup_con(z, labels, process_group="world"))
    # the same where keys are not gathered (only the mean's count is summed): rank 1's τ is invalid
    out["local_image"] = _catch(lambda: dense_info_nce(f, f, negatives="image", temperature=0.1 - 0.2 * rank,
                                                       process_group="world"))
    # the group still works after the errors
    out["after"] = _catch(lambda: nt_xent(z, z, process_group="world"))
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: every case, the DDP case, world size 1 against no distribution, the error cases."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        singles = [dist.new_group([r]) for r in range(world)]   # every rank creates every group
        pair = dist.new_group(list(range(world)))
        res = {"cases": {}}
        for i, name in enumerate(CASES):
            pg = ("world", dist.group.WORLD, pair)[i % 3]      # every spelling of the group
            res["cases"][name] = run_case(name, rank_inputs(name, rank), pg)
        res["world1"] = {name: (run_case(name, rank_inputs(name, rank), singles[rank]),
                                run_case(name, rank_inputs(name, rank), None))
                         for name in ("nt_xent_unequal", "sup_con_learned_tau", "dense_batch_symmetric",
                                             "dense_location_ids")}
        res["ddp"] = _ddp_case(rank, world)
        with record_communication() as rec:
            run_case("nt_xent", rank_inputs("nt_xent", rank), "world")
        res["comm"] = rec.calls
        res["errors"] = _error_cases(rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
