"""CPU benchmarks of issue 6: ARCO's contrast term and the overhead of GCL's Gradient Filter.

    python benchmarks/bench_arco_gcl.py                 # default sizes, results → benchmarks/results/arco_gcl_cpu.csv
    python benchmarks/bench_arco_gcl.py --reps 5 --all-anchors 32768 --filter-n 16384

Timed (forward + backward, float32, median of --reps after one warm-up, in this process):
- arco_sampled / ours:  `macl.semi.losses.prototype_contrast` with 256 anchors × 512 negatives per anchor
  (one grouped core call), per class; `--classes` classes → that many calls.
- arco_sampled / naive: the public code's transcription (cosine_similarity over [prototype | negatives], an
  A×(1+K)×D broadcast, then cross_entropy), same inputs.
- arco_all / ours: every anchor (`--all-anchors`) against the prototype and the whole bank (`--bank`), one
  `macl_kernels.info_nce` call per class (never an A×M matrix). arco_all / naive: the same with the logits
  materialised (skipped when A×M×4 bytes exceeds --naive-max-gib).
- filter / core vs filtered: pixel SupCon over N rows (labels from --filter-classes, self excluded) with the
  core (`grouped_info_nce`, impl torch) and with the Gradient Filter (`filtered_info_nce`, ρ = 0.5, both tilings);
  the CSV's "ratio" column is time / core time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from macl.semi.losses import prototype_contrast  # noqa: E402
from macl_kernels import grouped_info_nce, info_nce  # noqa: E402
from macl_kernels.filter.filtered import filtered_info_nce  # noqa: E402
from benchmarks.csv_out import write_csv  # noqa: E402

DEFAULT_CSV = os.path.join(HERE, "results", "arco_gcl_cpu.csv")


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def naive_sampled(anchors, proto, negs, tau):
    keys = torch.cat([proto.expand(anchors.shape[0], 1, -1), negs], 1)
    logits = F.cosine_similarity(anchors[:, None], keys, dim=2) / tau
    return F.cross_entropy(logits, torch.zeros(anchors.shape[0], dtype=torch.long))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64, help="representation width D")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--anchors", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=512)
    ap.add_argument("--bank", type=int, default=30000)
    ap.add_argument("--all-anchors", type=int, default=16384)
    ap.add_argument("--filter-n", type=int, default=8192)
    ap.add_argument("--filter-classes", type=int, default=256)
    ap.add_argument("--naive-max-gib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--csv", default=DEFAULT_CSV)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    D, tau, rows = args.dim, 0.5, []

    def record(case, impl, shape, seconds, ratio=None):
        rows.append({"case": case, "impl": impl, "shape": shape, "seconds": round(seconds, 4),
                     "ratio": None if ratio is None else round(ratio, 3), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "machine": platform.machine()})
        print(f"{case:14s} {impl:16s} {shape:34s} {seconds:8.4f} s" + ("" if ratio is None else f"  ×{ratio:.2f}"))

    # ARCO sampled: per class, A anchors each with its own K negatives from the bank
    A, K = args.anchors, args.negatives
    anchors = [torch.randn(A, D, requires_grad=True) for _ in range(args.classes)]
    protos = [torch.randn(D) for _ in range(args.classes)]
    negs = [torch.randn(A, K, D) for _ in range(args.classes)]

    def ours_sampled():
        sum(prototype_contrast(a, p, n, tau, impl="torch") for a, p, n in zip(anchors, protos, negs)).backward()

    def naive_s():
        sum(naive_sampled(a, p, n, tau) for a, p, n in zip(anchors, protos, negs)).backward()

    shape = f"{args.classes}x({A} anchors x {K} neg, D={D})"
    t_ours = timed(ours_sampled, args.reps)
    t_naive = timed(naive_s, args.reps)
    record("arco_sampled", "ours", shape, t_ours)
    record("arco_sampled", "naive", shape, t_naive, t_naive / t_ours)

    # ARCO "all": every anchor against the prototype + the whole bank (one class)
    N, M = args.all_anchors, args.bank
    q = torch.randn(N, D, requires_grad=True)
    bank = torch.randn(M, D)
    proto = torch.randn(D)
    keys = torch.cat([proto[None], bank])
    zero = torch.zeros(N, dtype=torch.long)
    shape = f"1x({N} anchors x {M} bank, D={D})"
    t_all = timed(lambda: info_nce(q, keys, zero, temperature=tau, impl="torch").backward(), args.reps)
    record("arco_all", "ours", shape, t_all)
    if N * (M + 1) * 4 / 2 ** 30 <= args.naive_max_gib:
        def naive_all():
            logits = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T / tau
            F.cross_entropy(logits, zero).backward()
        t_na = timed(naive_all, args.reps)
        record("arco_all", "naive", shape, t_na, t_na / t_all)

    # Gradient Filter overhead over the plain pixel loss
    n = args.filter_n
    x = F.normalize(torch.randn(n, D), dim=1).requires_grad_()
    lab = torch.randint(0, args.filter_classes, (n,))
    shape = f"N=M={n}, D={D}, rho=0.5"
    t_core = timed(lambda: grouped_info_nce(x, q_labels=lab, exclude_self=True, temperature=0.1,
                                            impl="torch").loss.backward(), args.reps)
    record("filter", "core", shape, t_core, 1.0)
    for tiling in ("rows", "radix"):
        t_f = timed(lambda: filtered_info_nce(x, rho=0.5, q_labels=lab, exclude_self=True, temperature=0.1,
                                              tiling=tiling).loss.backward(), args.reps)
        record("filter", f"filtered_{tiling}", shape, t_f, t_f / t_core)

    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
