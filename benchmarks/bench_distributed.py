"""Cross-device negatives on CPU: 2 gloo ranks against one process, bytes sent and per-rank peak memory.

    python benchmarks/bench_distributed.py                   # the sizes of the benchmark issue (~10 min)
    python benchmarks/bench_distributed.py --preset quick    # the smallest size of each loss (~1 min)

For each loss and global size, forward + backward of
- "distributed": `world` gloo ranks (processes on this machine, 1 thread each); rank r holds 1/world of the
  batch and calls the loss with process_group="world" (its anchors against every rank's keys);
- "single": one process (1 thread) with the whole batch and no process group.
Each case and mode runs in fresh processes, so that a peak is the case's own. Measured per rank: bytes
sent per step, counted from the tensor sizes of every collective (`macl_kernels.record_communication`, ring
algorithms: an all-gather or reduce-scatter of W·n rows sends (W − 1)·n rows per rank); extra memory = the
high-water mark of resident memory during the first step (VmHWM, reset through /proc/self/clear_refs once
the inputs exist, after a warm-up step on a tiny input of the same loss has paid the one-time costs) minus
the resident size then; the whole process's peak RSS; the median step time (one
thread per process, at most --reps steps and no new step after --budget-s; on a shared 2-core machine the
times are indicative only). The distributed loss is checked against the single-process one (mean over
ranks, rel. 1e-4).
One CSV row per (case, mode) → benchmarks/results/distributed_cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make macl_kernels importable
    sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

DEFAULT_CSV = os.path.join(HERE, "results", "distributed_cpu.csv")
TAU = 0.1

# (loss, global sizes) of the benchmark issue's grid (benchmarks/grids.py); dense: negatives="batch"
PRESETS = {
    "full": [("nt_xent", dict(B=b, D=128)) for b in (256, 1024, 4096)]
    + [("sup_con", dict(B=b, D=128)) for b in (512, 2048, 8192)]
    + [("positional_sup_con", dict(B=b, D=128)) for b in (512, 2048, 8192)]
    + [("dense_info_nce", dict(B=2, C=64, S=s)) for s in (16, 24, 32)],
    "quick": [("nt_xent", dict(B=256, D=128)), ("sup_con", dict(B=512, D=128)),
              ("positional_sup_con", dict(B=512, D=128)), ("dense_info_nce", dict(B=2, C=64, S=16))],
}


def shard_inputs(loss: str, dims: dict, part: int, parts: int, seed: int = 0) -> dict:
    """Part `part` of `parts` of the global batch (the batch B is split evenly), seeded per part."""
    g = torch.Generator().manual_seed(seed * 1000 + part)
    B = dims["B"] // parts
    if loss == "nt_xent":
        return dict(z1=torch.randn(B, dims["D"], generator=g), z2=torch.randn(B, dims["D"], generator=g))
    if loss == "sup_con":
        return dict(features=torch.randn(B, 2, dims["D"], generator=g), labels=torch.randint(0, 100, (B,), generator=g))
    if loss == "positional_sup_con":
        return dict(features=torch.randn(B, 2, dims["D"], generator=g), positions=torch.rand(B, generator=g))
    S, C = dims["S"], dims["C"]
    return dict(f1=torch.randn(B, C, S, S, S, generator=g), f2=torch.randn(B, C, S, S, S, generator=g))


def global_inputs(loss: str, dims: dict, world: int) -> dict:
    parts = [shard_inputs(loss, dims, r, world) for r in range(world)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _call(loss: str, inputs: dict, process_group):
    import macl_kernels as mk
    kw = dict(temperature=TAU, impl="torch", process_group=process_group)
    if loss == "positional_sup_con":
        kw["threshold"] = 0.1
    if loss == "dense_info_nce":
        kw["negatives"] = "batch"
    return getattr(mk, loss)(**inputs, **kw)


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _measure(loss: str, inputs: dict, process_group, reps: int, budget_s: float) -> dict:
    from macl_kernels import record_communication
    leaves = [v.requires_grad_() for k, v in inputs.items() if v.is_floating_point() and k != "positions"]

    def step():
        for v in leaves:
            v.grad = None
        out = _call(loss, inputs, process_group)
        out.backward()
        return out

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # VmHWM := VmRSS, with the inputs resident
    base_kb = _kb("VmRSS")
    t0 = time.perf_counter()
    with record_communication() as rec:           # the first step: its memory, its bytes, its time
        value = float(step().detach())
    times = [time.perf_counter() - t0]
    peak_kb = _kb("VmHWM")
    while len(times) < reps and sum(times) < budget_s:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    by_op = {}
    for op, _, nbytes in rec.calls:
        by_op[op] = by_op.get(op, 0.0) + nbytes
    return dict(loss_value=value, median_s=statistics.median(times), reps=len(times),
                extra_mb=(peak_kb - base_kb) / 1024, peak_rss_mb=peak_kb / 1024, bytes_sent=sum(by_op.values()),
                bytes_all_gather=by_op.get("all_gather", 0.0), bytes_reduce_scatter=by_op.get("reduce_scatter", 0.0),
                bytes_all_reduce=by_op.get("all_reduce", 0.0))


def _worker(rank: int, world: int, shards: int, case: tuple, reps: int, budget_s: float, out_dir: str) -> None:
    """One fresh process per case and mode (so that its peak memory is its own): distributed (world > 1:
    this rank's shard) or single (the whole batch of `shards` shards)."""
    distributed = world > 1
    torch.set_num_threads(1)   # every process computes on one thread (times are per process, not a speed-up)
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        loss, dims = case
        pg = "world" if distributed else None
        tiny = dict(dims, B=2 * shards, **({"S": 4} if "S" in dims else {}))   # one-time costs (autograd,
        warm = shard_inputs(loss, tiny, rank, shards) if distributed else global_inputs(loss, tiny, shards)
        _measure(loss, warm, pg, 1, 0.0)                                         # thread pools, gloo buffers)
        del warm
        inputs = shard_inputs(loss, dims, rank, shards) if distributed else global_inputs(loss, dims, shards)
        result = _measure(loss, inputs, pg, reps, budget_s)
    finally:
        if distributed:
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"{'dist' if distributed else 'single'}{rank}.pt"))


def _spawn(case: tuple, world: int, shards: int, reps: int, budget_s: float) -> list:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, shards, case, reps, budget_s, d), nprocs=world, join=True)
        name = "dist" if world > 1 else "single"
        return [torch.load(os.path.join(d, f"{name}{r}.pt")) for r in range(world)]


def run(cases: list, world: int, reps: int, budget_s: float = 10.0) -> list[dict]:
    """Every case with `world` ranks and in one process; one fresh set of processes per case and mode."""
    per_rank, single = [], []
    for case in cases:
        per_rank.append(_spawn(case, world, world, reps, budget_s))
        single.append(_spawn(case, 1, world, reps, budget_s)[0])
        sys.stdout.write(f"done {case}\n")
        sys.stdout.flush()
    rows = []
    meta = dict(machine=platform.node(), cpu_count=os.cpu_count(), torch=torch.__version__, backend="gloo",
                dtype="float32", impl="torch")
    for i, (loss, dims) in enumerate(cases):
        ranks = per_rank[i]
        mean_loss = statistics.fmean(r["loss_value"] for r in ranks)
        ok = abs(mean_loss - single[i]["loss_value"]) <= 1e-4 * max(1.0, abs(single[i]["loss_value"]))
        shape = " ".join(f"{k}={v}" for k, v in dims.items())
        common = dict(meta, loss=loss, shape=shape, world=world)
        worst = max(ranks, key=lambda r: r["extra_mb"])
        rows.append(dict(common, mode="distributed", threads_per_process=1, loss_value=mean_loss,
                         status="ok" if ok else "mismatch",
                         **{k: max(r[k] for r in ranks) for k in ("median_s", "reps", "peak_rss_mb", "bytes_sent",
                                                                  "bytes_all_gather", "bytes_reduce_scatter",
                                                                  "bytes_all_reduce")},
                         extra_mb=worst["extra_mb"]))
        rows.append(dict(common, mode="single", threads_per_process=1, status="ok", **single[i]))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per case at most (the first included)")
    ap.add_argument("--budget-s", type=float, default=10.0, help="no further steps once a case has taken this long")
    ap.add_argument("--out", default=DEFAULT_CSV)
    args = ap.parse_args(argv)
    rows = run(PRESETS[args.preset], args.world, args.reps, args.budget_s)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fields = ["loss", "shape", "mode", "world", "threads_per_process", "status", "loss_value", "bytes_sent",
              "bytes_all_gather", "bytes_reduce_scatter", "bytes_all_reduce", "extra_mb", "peak_rss_mb",
              "median_s", "reps", "backend", "dtype", "impl", "torch", "machine", "cpu_count"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        sys.stdout.write(f"{r['loss']:<20} {r['shape']:<18} {r['mode']:<11} sent {r['bytes_sent'] / 2**20:8.3f} MiB  "
                         f"extra {r['extra_mb']:8.1f} MB  {r['median_s']:7.3f} s  {r['status']}\n")
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
