"""GCL-style against MACL: one full pre-training step at the same batch, crop and network, with the per-term
split, and the Gradient Filter against the plain fused pixel loss (issue 16, "Performance").

    python benchmarks/bench_gcl_step.py                          # batch 16, 128², F = 32, depth 4; filter at 8192
    python benchmarks/bench_gcl_step.py --reps 5 --threads 2 --filter-n 8192
    python benchmarks/bench_gcl_step.py --filter-only --filter-threads 1,2 --filter-reps 7   # the filter alone

Step (what `macl.train.pretrain` does per iteration: forward, L = Σ weight·term, backward, SGD update), both
methods built in this process and timed INTERLEAVED (macl, gcl, macl, gcl, …) so that a shared machine's load
hits both alike; the figure that matters is the ratio of the medians.
- MACL: `MethodConfig(name="macl")` (the paper's L_g + L_d "location" + L_ER), impl "torch".
- GCL-style: `MethodConfig(name="gcl")` with its defaults (meta-labels position + volume, ρ = 0.5, PCGrad
  mitigator, sampled pixel anchors/keys `gcl_pixel_anchors` / `gcl_pixel_keys`, or --pixel-anchors/--pixel-keys),
  batch.meta = a volume id per sample (--volumes distinct volumes).
Per-term split: each loss function a method calls (MACL: global_loss, dense_loss, equivariance_loss; GCL:
positional_sup_con / sup_con = L_img_*, pixel_loss = L_pix_*, sampling included) is wrapped: its forward is
timed directly, its backward between an autograd stamp on its output and one on its inputs (one thread runs the
loss's backward nodes back to back, so this is its backward time; with more threads it is approximate).
"rest" = step − Σ terms: the networks' forward and backward, the mitigator's PCGrad, the optimiser.
Filter: pixel SupCon over N = M = --filter-n rows (D = 64, labels from 256 classes, self excluded, τ = 0.1),
forward + backward, `grouped_info_nce` (impl torch) against `filtered_info_nce` (ρ = --rho), interleaved (core,
filtered, core, …) after one warm-up each, for each of --filter-threads in the same process; --filter-histogram
adds the filter with the histogram selection in the "rows" tiling (`filtered.ROWS_SELECT`, the method before
the sample bracket; same backward). Each row records the median wall time (median_s) and the median CPU time
of the process (cpu_s: less sensitive to other jobs on a shared machine; with more threads it adds the
threads up), the host (benchmarks/host.py: CPU, ISA flags) and the 1-minute load average after the row.
Results go to benchmarks/results/gcl_step_cpu.csv (one row per measured thing; --csv to change).
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import macl.methods.gcl as gcl_mod  # noqa: E402
import macl.methods.macl as macl_mod  # noqa: E402
from macl.settings.config import MethodConfig, NetConfig  # noqa: E402
from macl.methods import Batch, build_method  # noqa: E402
from macl_kernels import grouped_info_nce  # noqa: E402
from macl_kernels.filter.filtered import filtered_info_nce  # noqa: E402
import macl_kernels.filter.filtered as filtered_mod  # noqa: E402
import macl_kernels.eager.self_tiles as self_tiles  # noqa: E402
from benchmarks.csv_out import write_csv  # noqa: E402
from benchmarks.host import host_info, host_line  # noqa: E402

CLOCK: dict = defaultdict(float)          # term → seconds in the current step
STAMPS: dict = {}
CALLS = itertools.count()


class _Stamp(torch.autograd.Function):
    """Identity on tensors; its backward records the time under (key, which)."""

    @staticmethod
    def forward(ctx, key, which, *xs):
        ctx.key, ctx.which = key, which
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        now = time.perf_counter()
        if ctx.which == "start":
            STAMPS[ctx.key] = now
        else:
            CLOCK[ctx.key[0] + ".bwd"] += now - STAMPS.pop(ctx.key, now)
        return (None, None) + grads


def timed(term: str, fn):
    """fn wrapped: forward time into CLOCK[term + '.fwd'], backward time into CLOCK[term + '.bwd']."""
    def wrapper(*args, **kw):
        key = (term, next(CALLS))
        t0 = time.perf_counter()
        idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        args = list(args)
        if idx:
            for i, x in zip(idx, _Stamp.apply(key, "end", *[args[i] for i in idx])):
                args[i] = x
        out = fn(*args, **kw)
        CLOCK[term + ".fwd"] += time.perf_counter() - t0
        return _Stamp.apply(key, "start", out)[0] if out.requires_grad else out
    return wrapper


def install_timers() -> None:
    for name in ("global_loss", "dense_loss", "equivariance_loss"):
        setattr(macl_mod, name, timed({"global_loss": "L_g", "dense_loss": "L_d",
                                       "equivariance_loss": "L_ER"}[name], getattr(macl_mod, name)))
    gcl_mod.positional_sup_con = timed("L_img", gcl_mod.positional_sup_con)
    gcl_mod.sup_con = timed("L_img", gcl_mod.sup_con)
    gcl_mod.pixel_loss = timed("L_pix", gcl_mod.pixel_loss)


def make_step(method, batch):
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)

    def step():
        CLOCK.clear()
        t0 = time.perf_counter()
        terms = method(batch)
        loss = method.combine(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = time.perf_counter() - t0
        split = {}
        for k, v in CLOCK.items():
            term = k.rsplit(".", 1)[0]
            split[term] = split.get(term, 0.0) + v
        split["rest"] = total - sum(split.values())
        return total, split
    return step


def host() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return f"{model}, {os.cpu_count()} CPUs, load average {load[0]:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="2D crop edge")
    ap.add_argument("--width", type=int, default=32, help="U-Net base width F")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--volumes", type=int, default=8, help="distinct volume ids in a batch (GCL's 'volume' label)")
    ap.add_argument("--pixel-anchors", default=None, help="GCL gcl_pixel_anchors (default: the config's)")
    ap.add_argument("--pixel-keys", default=None, help="GCL gcl_pixel_keys (default: the config's)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per method (after one warm-up each)")
    ap.add_argument("--filter-n", type=int, default=8192, help="rows of the filter comparison (0: skip it)")
    ap.add_argument("--filter-reps", type=int, default=3)
    ap.add_argument("--filter-only", action="store_true", help="time only the filter against the plain loss")
    ap.add_argument("--filter-threads", default=None,
                    help="comma-separated torch thread counts for the filter comparison (default: --threads)")
    ap.add_argument("--filter-histogram", action="store_true",
                    help="also time the filter with the histogram selection in the rows tiling")
    ap.add_argument("--rho", type=float, default=0.5, help="the filter's ρ")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "gcl_step_cpu.csv"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"host: {host()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []

    def record(what, impl, seconds, ratio=None, note="", cpu=None, cpu_ratio=None):
        h = host_info()
        rows.append({"what": what, "impl": impl, "median_s": round(seconds, 4),
                     "ratio": None if ratio is None else round(ratio, 3), "note": note,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                     "host": host(), "cpu_s": None if cpu is None else round(cpu, 4),
                     "cpu_ratio": None if cpu_ratio is None else round(cpu_ratio, 3), "isa": h["isa"],
                     "load_1min": h["load_1min"]})
        print(f"{what:8s} {impl:22s} {seconds:9.4f} s" + ("" if ratio is None else f"  ×{ratio:.2f}") +
              ("" if cpu is None else f"   cpu {cpu:.4f} s ×{cpu_ratio:.2f}") + (f"  ({note})" if note else ""),
              flush=True)

    print(host_line(), flush=True)
    if not args.filter_only:
        run_steps(args, record)
    if args.filter_n:
        threads = [int(t) for t in args.filter_threads.split(",")] if args.filter_threads else [None]
        for th in threads:
            if th:
                torch.set_num_threads(th)
            run_filter(args, record)

    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")
    return 0


def run_steps(args, record) -> None:
    """The MACL and GCL-style steps, interleaved, with the per-term split."""
    install_timers()
    torch.manual_seed(0)
    net = NetConfig(dims=2, base_width=args.width, depth=args.depth)
    gkw = {}
    for key, val in (("gcl_pixel_anchors", args.pixel_anchors), ("gcl_pixel_keys", args.pixel_keys)):
        if val is not None:
            gkw[key] = val if val == "all" else int(val)
    methods = {"macl": build_method(net, MethodConfig(name="macl", impl="torch")),
               "gcl": build_method(net, MethodConfig(name="gcl", impl="torch", **gkw))}
    B, S = args.batch, args.size
    shape = (B, 1, S, S)
    batch = Batch(positions=torch.rand(B), img1=torch.rand(shape), img2=torch.rand(shape), img3=torch.rand(shape),
                  img4=torch.rand(shape), meta=(torch.arange(B) % args.volumes).float()[:, None])
    steps = {k: make_step(m, batch) for k, m in methods.items()}
    times, splits = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for k in steps:
        steps[k]()                                          # warm-up
    for _ in range(args.reps):
        for k, step in steps.items():
            total, split = step()
            times[k].append(total)
            for term, sec in split.items():
                splits[k][term].append(sec)
    gc = methods["gcl"].cfg
    desc = (f"batch {B}, {S}^2, F={args.width}, depth {args.depth}; gcl anchors/keys "
            f"{gc.gcl_pixel_anchors}/{gc.gcl_pixel_keys} per image, rho {gc.gcl_rho}")
    base = statistics.median(times["macl"])
    for k in steps:
        med = statistics.median(times[k])
        record("step", k, med, med / base, desc)
        for term, secs in sorted(splits[k].items()):
            record("term", f"{k}:{term}", statistics.median(secs), statistics.median(secs) / med, "share of its step")


def run_filter(args, record) -> None:
    """Forward + backward of the plain fused loss and of the filtered one, interleaved (wall and CPU time)."""
    n = args.filter_n
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, 64, generator=gen), dim=1).requires_grad_()
    lab = torch.randint(0, 256, (n,), generator=gen)

    def filtered(select):
        def fn():
            filtered_mod.ROWS_SELECT = select
            try:
                filtered_info_nce(x, rho=args.rho, q_labels=lab, exclude_self=True, temperature=0.1).loss.backward()
            finally:
                filtered_mod.ROWS_SELECT = "bracket"
        return fn

    def core_general():   # the plain loss without the symmetric self-contrast tiling (as when q is not k)
        self_tiles.ENABLED = False
        try:
            grouped_info_nce(x, q_labels=lab, exclude_self=True, temperature=0.1, impl="torch").loss.backward()
        finally:
            self_tiles.ENABLED = True

    fns = {"core": lambda: grouped_info_nce(x, q_labels=lab, exclude_self=True, temperature=0.1,
                                            impl="torch").loss.backward(),
           "core_general_tiling": core_general,
           "filtered": filtered("bracket")}
    if args.filter_histogram:
        fns["filtered_histogram"] = filtered("histogram")
    wall, cpu = defaultdict(list), defaultdict(list)
    for f in fns.values():
        f()
    for _ in range(args.filter_reps):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            x.grad = None
    core, core_cpu = statistics.median(wall["core"]), statistics.median(cpu["core"])
    for k in fns:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        record("filter", k, w, w / core, f"N=M={n}, D=64, 256 classes, rho={args.rho}, fwd+bwd, "
               f"{args.filter_reps} interleaved reps", c, c / core_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
