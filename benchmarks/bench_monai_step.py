"""One MACL pre-training step on MONAI's DynUNet (nnU-Net-like, 3D) against the built-in U-Net, same crop and batch.

    python benchmarks/bench_monai_step.py                       # 3D batch 2 at 96³, 2 timed steps per network
    python benchmarks/bench_monai_step.py --size 64 --reps 1

A step is what `macl.train.pretrain` does per iteration: MACL's four passes (two encoder-only, two dominant
encoder + 2 decoder levels), L = λ1·L_g + λ2·L_d + λ3·L_ER, backward, SGD. L_d is the dense form
(`dense_mode="voxel"`, negatives "batch": every voxel of the batch's auxiliary pixel maps against every voxel
of the dominant maps — 2·12³ = 3456 × 3456 pairs at 96³) through `macl_kernels`' chunked core (impl "torch" on
CPU, the fused Triton kernels on CUDA), which never holds the N×M matrix.

Networks, both with the bottleneck at 1/8 (96 = 3·32: MACL's ×0.25 dominant view 24³ must pass the encoder):
- dynunet: monai DynUNet, kernel 3, strides 1,2,2,2, filters 32,64,128,256, MONAI's default instance norm,
  tapped at ``bottleneck`` / ``upsamples.1`` (macl/nets/monai_maps.py);
- unet: the built-in U-Net, F = 32, depth 3, batch norm (its bottleneck has 256 channels, as DynUNet's).
Each network runs in a fresh subprocess; peak memory is the growth of max RSS from before the warm-up step (CPU;
the model and inputs excluded) or
torch.cuda.max_memory_allocated (CUDA). Rows go to benchmarks/results/monai_step_cpu.csv with the host.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DYNUNET = {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2],
           "filters": [32, 64, 128, 256]}
NETS = ("dynunet", "unet")


def run_case(name: str, size: int, batch: int, reps: int, device: str) -> dict:
    import resource

    import torch

    from macl.methods import Batch, build_method
    from macl.settings.config import MethodConfig, NetConfig
    torch.manual_seed(0)
    net = (NetConfig(dims=3, arch="monai:DynUNet", arch_args=DYNUNET) if name == "dynunet"
           else NetConfig(dims=3, base_width=32, depth=3))
    method = build_method(net, MethodConfig(name="macl", dense_mode="voxel", dense_negatives="batch")).to(device)
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    shape = (batch, 1) + (size,) * 3
    b = Batch(positions=torch.rand(batch), img1=torch.rand(shape), img2=torch.rand(shape),
              img3=torch.rand(shape), img4=torch.rand(shape)).to(device)

    def step():
        terms = method(b)
        loss = method.combine(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return {k: float(v.detach()) for k, v in terms.items()}

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    L = (size // 8) ** 3
    return dict(net=name, dims=3, batch=batch, size=size, device=device, dense_pairs=(batch * L) ** 2,
                params=sum(p.numel() for p in method.model.parameters()), times=times, peak_bytes=peak, terms=terms,
                threads=torch.get_num_threads())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    ap.add_argument("--size", type=int, default=96, help="crop side (multiple of 32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed steps per network (after one warm-up step)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "monai_step_cpu.csv"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.size, args.batch, args.reps, args.device)))
        return 0
    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks.csv_out import write_csv
    from benchmarks.host import host_info, host_line
    host = host_info()
    print(host_line(host), flush=True)
    rows = []
    for name in args.nets:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(args.size), "--batch",
                              str(args.batch), "--reps", str(args.reps), "--device", args.device],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        med = statistics.median(r["times"])
        rows.append(dict(date=time.strftime("%Y-%m-%d", time.gmtime()), cpu=host["cpu"], cpu_count=host["cpu_count"],
                         load_1min=host["load_1min"], torch=host["torch"], threads=r["threads"], device=r["device"],
                         net=name, dims=3, batch=r["batch"], size=r["size"], params=r["params"],
                         dense_pairs=r["dense_pairs"], median_s=round(med, 3), min_s=round(min(r["times"]), 3),
                         peak_mib=round(r["peak_bytes"] / 2**20, 1), L_g=r["terms"].get("L_g"),
                         L_d=r["terms"].get("L_d"), L_ER=r["terms"].get("L_ER")))
        print(f"{name}: batch {r['batch']} at {r['size']}^3 on {r['device']}: {med:.2f} s per step, "
              f"{r['peak_bytes'] / 2**20:.0f} MiB peak ({r['params'] / 1e6:.2f} M parameters)", flush=True)
    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
