"""Can a fused CPU tile kernel beat the eager tiles of the torch path? (issue 15, item 3)

    python benchmarks/bench_cpu_tile.py                     # N = M = 8192, D = 128, 1 and 2 threads
    python benchmarks/bench_cpu_tile.py --n 16384 --threads 2

The forward of the tiled algorithm (eager/tiled.py) over an N×M problem: for each 512×1024 tile,
e = exp(s·q kᵀ − B) and its row sums. Four ways, each checked against float64 row sums:
- eager:    what the torch path runs: torch.baddbmm(−B, q_tile, k_blockᵀ), e.exp_(), e.sum(−1): the GEMM, then
            two more passes over the 2 MiB tile.
- compile:  torch.compile of the same tile function (Inductor: the GEMM as an ATen call, the bias, exp and row
            sum fused into one generated C++ loop; needs a C++ compiler at run time). First-call compile time
            reported.
- autotune: torch.compile(mode="max-autotune-no-cudagraphs") with Inductor's C++ GEMM template allowed
            (max_autotune_gemm_backends="CPP,ATEN"), which can fuse the epilogue into the GEMM itself.
- ext:      a C++/OpenMP extension (benchmarks/fused_tile_ext.cpp, built here by torch.utils.cpp_extension.load):
            one call for the whole forward; per thread a row block, for each key block at::mm into an L2-sized
            buffer, then exp (ATen's Vectorized exp_u20) and the row sum while the block is in cache. Build
            time reported.
- limit:    1 GEMM unit + 1 exp pass at the in-cache rates (benchmarks/limits.py), the forward's share of §6.
Timing: interleaved rounds (eager, compile, autotune, ext), the median of each; CPU seconds of the process
(all threads) beside wall seconds, because the machine may be shared. The host is printed first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host import host_info, host_line  # noqa: E402
from benchmarks.limits import limit_seconds, measure_rates  # noqa: E402

BR, BC = 512, 1024


def tile_fn(qt, kt, bt):
    """Row sums of exp(qt ktᵀ − bt) for one tile: qt (br, D) already scaled, kt (bc, D), bt (br,)."""
    import torch
    return torch.exp(torch.mm(qt, kt.t()) - bt[:, None]).sum(-1)


def eager_forward(q, k, bound):
    import torch
    S = q.new_zeros(q.shape[0])
    for c0 in range(0, k.shape[0], BC):
        kt = k[c0:c0 + BC].t()
        for r0 in range(0, q.shape[0], BR):
            e = torch.baddbmm(-bound[None, r0:r0 + BR, None], q[None, r0:r0 + BR], kt[None])
            S[r0:r0 + BR] += e.exp_().sum(-1)[0]
    return S


def tiled_with(fn):
    def forward(q, k, bound):
        S = q.new_zeros(q.shape[0])
        for c0 in range(0, k.shape[0], BC):
            kt = k[c0:c0 + BC]
            for r0 in range(0, q.shape[0], BR):
                S[r0:r0 + BR] += fn(q[r0:r0 + BR], kt, bound[r0:r0 + BR])
        return S
    return forward


def build_ext():
    """Build the extension (seconds, module) with flags for this CPU; None when it cannot build."""
    from torch.utils.cpp_extension import load
    isa = host_info()["isa"].split()
    if "avx512f" in isa:
        flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-DCPU_CAPABILITY_AVX512",
                 "-DCPU_CAPABILITY=AVX512"]
    elif "avx2" in isa:
        flags = ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    else:
        flags = []
    t0 = time.perf_counter()
    try:
        mod = load(name="macl_fused_tile_bench", sources=[os.path.join(HERE, "fused_tile_ext.cpp")],
                   extra_cflags=["-O3", "-fopenmp"] + flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers: the point is to report it
        print(f"ext: cannot build ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None, None
    return time.perf_counter() - t0, mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-autotune", action="store_true", help="skip the max-autotune variant (slow to compile)")
    args = ap.parse_args(argv)
    import torch
    print(host_line(), flush=True)
    N, D = args.n, args.dim
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1) * 10.0   # s·q̂, τ = 0.1
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    bound = torch.full((N,), 10.0)
    truth = torch.exp(q.double() @ k.double().t() - 10.0).sum(-1)

    impls = {"eager": eager_forward}
    t0 = time.perf_counter()
    compiled = torch.compile(tile_fn, dynamic=False)
    impls["compile"] = tiled_with(compiled)
    impls["compile"](q, k, bound)
    print(f"compile: first call (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_autotune:
        import torch._inductor.config as icfg
        icfg.max_autotune_gemm_backends = "CPP,ATEN"
        t0 = time.perf_counter()
        auto = torch.compile(tile_fn, dynamic=False, mode="max-autotune-no-cudagraphs")
        impls["autotune"] = tiled_with(auto)
        impls["autotune"](q, k, bound)
        print(f"autotune: first call (compile + autotune) {time.perf_counter() - t0:.1f} s", flush=True)
    build_s, ext = build_ext()
    if ext is not None:
        print(f"ext: build {build_s:.1f} s", flush=True)
        impls["ext"] = lambda q_, k_, b_: ext.fwd_rowsum(q_, k_, b_, BR, BC)
    for name, fn in impls.items():
        err = float(((fn(q, k, bound).double() - truth).abs() / truth).max())
        assert err < 1e-4, f"{name}: relative error {err}"
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates = measure_rates(D)
        limit = limit_seconds(rates, 2.0 * N * N * D, float(N) * N, "forward")
        wall = {n: [] for n in impls}
        cpu = {n: [] for n in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(q, k, bound)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        base = statistics.median(wall["eager"])
        print(f"threads={threads} N=M={N} D={D} forward: limit {limit:.3f} s, load {os.getloadavg()[0]:.1f}")
        for name in impls:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"  {name:9s} wall {w:.3f} s ({w / limit:.2f}x limit, {w / base:.2f}x eager), cpu {c:.3f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
