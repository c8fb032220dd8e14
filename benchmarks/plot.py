"""Plots of a sweep CSV: time and extra memory against problem size (log-log), per loss, ours vs peers.

    python -m benchmarks.plot                                   # benchmarks/results/sweep_cpu.csv -> docs/bench/
    python -m benchmarks.plot --csv my.csv --out docs/bench --format png

One PNG per loss (`<device>_<loss>.png`): rows = the phases swept (forward, forward+backward), columns = median time
(p20–p80 band) and extra memory (peak − inputs). The limit (CPU) or H100 roofline floor (CUDA) is the dashed
black line. Cases that ran out of memory or over their time budget are marked ✕ / ◷ on the top edge.
Where a loss was swept at several feature sizes D, the most common D is plotted (the CSV has the rest).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter, defaultdict

from .cases import LOSSES, PHASES, X_LABEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLE = {  # implementation -> (label, colour, marker)
    "triton": ("ours: triton", "#d62728", "o"), "torch": ("ours: torch", "#1f77b4", "o"),
    "reference": ("ours: reference", "#9ecae1", "."), "naive": ("naive PyTorch", "#7f7f7f", "s"),
    "compile": ("torch.compile(naive)", "#bcbd22", "s"), "monai": ("MONAI ContrastiveLoss", "#2ca02c", "^"),
    "lightly": ("lightly NTXentLoss", "#ff7f0e", "v"), "pml": ("pytorch-metric-learning", "#9467bd", "D"),
    "pcl": ("PCL public code", "#8c564b", "P"), "macl_loop": ("MACL public loop", "#e377c2", "P"),
    "limit": ("CPU limit", "black", None), "roofline_h100": ("H100 roofline floor", "black", None),
}


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_loss(rows: list[dict], loss: str, out_path: str, title_extra: str = "") -> bool:
    """Draw one loss's figure to out_path; False when the CSV has no row of that loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in rows if r["loss"] == loss]
    if not rows:
        return False
    main_d = Counter(r["D"] for r in rows if r["impl"] not in ("limit", "roofline_h100")).most_common(1)[0][0]
    rows = [r for r in rows if r["D"] == main_d]
    phases = [p for p in PHASES if any(r["phase"] == p and r["impl"] not in ("limit", "roofline_h100") for r in rows)]
    fig, axes = plt.subplots(len(phases), 2, figsize=(11, 4 * len(phases)), squeeze=False)
    for i, phase in enumerate(phases):
        series = defaultdict(list)
        for r in rows:
            if r["phase"] == phase:
                series[(r["impl"], r["dtype"])].append(r)
        ax_t, ax_m = axes[i]
        dtypes = {k[1] for k in series}
        for (impl, dtype), rs in sorted(series.items(), key=lambda kv: list(STYLE).index(kv[0][0])
                                        if kv[0][0] in STYLE else 99):
            label, colour, marker = STYLE.get(impl, (impl, None, "o"))
            if len(dtypes) > 1:
                label += f" ({dtype})"
            ok = sorted((int(r["x"]), r) for r in rs if r["status"] == "ok" and _num(r["median_s"]))
            xs = [x for x, _ in ok]
            if impl in ("limit", "roofline_h100"):
                ax_t.plot(xs, [_num(r["median_s"]) for _, r in ok], "--", color="black", label=label, lw=1)
                continue
            if ok:
                t = [_num(r["median_s"]) for _, r in ok]
                ax_t.plot(xs, t, marker=marker, color=colour, label=label)
                lo = [_num(r["p20_s"]) or v for (_, r), v in zip(ok, t)]
                hi = [_num(r["p80_s"]) or v for (_, r), v in zip(ok, t)]
                ax_t.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0)
                m = [(x, _num(r["extra_mb"])) for x, r in ok if _num(r["extra_mb"]) is not None]
                if m:
                    ax_m.plot([x for x, _ in m], [max(v, 0.1) for _, v in m], marker=marker, color=colour,
                              label=label)
            failed = [(int(r["x"]), r["status"]) for r in rs if r["status"] in ("out of memory", "too slow")]
            for ax in (ax_t, ax_m):
                tr = blended_transform_factory(ax.transData, ax.transAxes)
                for x, status in failed:
                    ax.plot([x], [0.97], marker="x" if status == "out of memory" else "$◷$", color=colour,
                            transform=tr, ms=9, clip_on=False)
        for ax, ylabel in ((ax_t, "median time (s)"), (ax_m, "extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(X_LABEL.get(loss, "x"))
            ax.set_ylabel(ylabel)
            ax.set_title(f"{phase}")
            ax.grid(True, which="both", alpha=0.3)
        if series:
            ax_t.legend(fontsize=7, loc="upper left")
    dev = rows[0].get("device_name") or rows[0].get("device", "")
    fig.suptitle(f"{loss} (D = {main_d}) on {dev} {title_extra}\n✕ out of memory, ◷ over the time budget",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "sweep_cpu.csv"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"), help="output folder (default docs/bench)")
    ap.add_argument("--format", default="png")
    a = ap.parse_args(argv)
    rows = read_rows(a.csv)
    if not rows:
        raise SystemExit(f"{a.csv} has no rows")
    device = rows[0].get("device", "cpu")
    written = []
    for loss in LOSSES:
        path = os.path.join(a.out, f"{device}_{loss}.{a.format}")
        if plot_loss(rows, loss, path, title_extra=f"[{rows[0].get('sweep_id', '')}]"):
            written.append(path)
    for p in written:
        print(p)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
