"""Data loading vs training on the demo data (issue 4, "Performance"): does the loader starve training?

    python benchmarks/bench_loader.py            # writes benchmarks/results/loader_cpu.csv

Measured in one process on the demo's phantom data set (12 volumes of 64×64×32 by default):
- volumes/s read + pre-processed from NIfTI with no cache, then from a warm cache (`PreprocessConfig.cache_dir`);
- pre-training samples/s (all four MACL views built) for 2D slices (64²) and 3D patches (32³);
- one MACL training step (forward, backward, SGD) on one such batch, with the demo's 2D U-Net (F = 16) and a
  3D U-Net (F = 8, depth 3), so the two rates can be compared: loader time per batch vs step time.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=5, help="batches timed per loader case")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "loader_cpu.csv"))
    args = ap.parse_args(argv)

    import torch

    from macl.settings.config import MethodConfig, NetConfig
    from macl.data import (PhantomConfig, PreprocessConfig, PretrainDataConfig, PretrainDataset,
                           iterate_pretrain_batches, load_volumes, open_dataset, write_phantom_dataset)
    from macl.methods import Batch, build_method

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom_dataset(os.path.join(tmp, "data"), PhantomConfig(n_subjects=args.subjects))
        index = open_dataset(root)
        cache = os.path.join(tmp, "cache")
        for label, cfg in (("no cache", PreprocessConfig()), ("cold cache (writes it)", PreprocessConfig(cache_dir=cache)),
                           ("warm cache", PreprocessConfig(cache_dir=cache))):
            t0 = time.perf_counter()
            volumes = load_volumes(index, cfg)
            dt = time.perf_counter() - t0
            rows.append(dict(case=f"load volumes, {label}", unit="volumes/s", rate=len(volumes) / dt, seconds=dt))

        for dims, patch, net in ((2, (64, 64), NetConfig(dims=2, base_width=16, depth=4)),
                                 (3, (32, 32, 32), NetConfig(dims=3, base_width=8, depth=3))):
            ds = PretrainDataset(volumes, PretrainDataConfig(dims=dims, patch_size=patch))
            it = iterate_pretrain_batches(ds, args.batch_size, epoch=0)
            next(it)
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(args.batches)]
            dt = (time.perf_counter() - t0) / args.batches
            rows.append(dict(case=f"{dims}D pre-training batch {args.batch_size}×{patch}, 4 views",
                             unit="samples/s", rate=args.batch_size / dt, seconds=dt))
            torch.manual_seed(0)
            method = build_method(net, MethodConfig(name="macl", decoder_blocks=2 if dims == 2 else 1,
                                                    dominant_scale=0.25 if dims == 2 else 0.5))
            opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
            times = []
            for b in batches[:3]:
                batch = Batch.from_any(b)
                t0 = time.perf_counter()
                loss = method.combine(method(batch))
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            step = sorted(times)[len(times) // 2]
            rows.append(dict(case=f"{dims}D MACL training step, same batch", unit="samples/s",
                             rate=args.batch_size / step, seconds=step))

    for r in rows:
        r.update(machine=platform.machine(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
        print(f"{r['case']:55s} {r['rate']:10.1f} {r['unit']:10s} ({r['seconds']:.3f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
