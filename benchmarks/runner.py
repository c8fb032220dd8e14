"""Run one case in a fresh process: check it against the reference on a small input, then time it.

    python -m benchmarks.runner '<case json>' [--mem-cap-gb 16]     (the sweep calls this; prints one JSON line)

Steps in the child:
1. Equivalence check: the implementation on a small input of the same loss (cases.CHECK_DIMS) against
   macl_kernels' float64 reference: the loss, and for forward+backward the input gradients. A failure is
   status "mismatch" and nothing is timed.
2. Memory cap (CPU): RLIMIT_AS = address space now + the cap, so an implementation that asks for too much
   fails with an allocation error ("out of memory") instead of pushing the machine into swap or the OOM killer.
3. Peak memory: CPU: the kernel's high-water mark of resident memory (VmHWM, reset through
   /proc/self/clear_refs after the inputs exist), so `extra_mb` = peak − resident size with inputs;
   `peak_mb` = the process's whole peak (interpreter and libraries included). CUDA: torch's max allocated.
4. Timing: one warm-up call (also the compile of torch.compile), then timed calls until `max_reps`, or at
   least 3 calls and 1 s, or the budget. If the warm-up alone took over half the budget (or the case says
   warmup=False) that single call is the sample (reps = 0 in the CSV). A watchdog ends the process with
   status "too slow" when the budget runs out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

from .cases import CHECK_DIMS, Case, make_fn, make_inputs

MIN_REPS, MIN_TIME = 3, 1.0
#: (loss relative tolerance, gradient tolerance relative to the largest reference gradient) per dtype
TOLERANCE = {"float32": (1e-4, 1e-3), "float64": (1e-9, 1e-8), "float16": (1e-2, 3e-2), "bfloat16": (5e-2, 1e-1)}


class Mismatch(Exception):
    pass


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def check_small(case: Case, fn) -> dict:
    """Run `fn` on the small input of case.loss and compare with the float64 reference. Raises Mismatch."""
    import torch
    dtype = getattr(torch, case.dtype)
    d = dict(CHECK_DIMS[case.loss])
    feats, meta = make_inputs(case.loss, d, dtype, case.device, seed=1)
    ref_feats = [f.detach().double().requires_grad_() for f in feats]
    ref = make_fn(case.loss, "reference")(*ref_feats, **meta)
    out = fn(*feats, **meta)
    err = abs(float(out.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1e-12)
    tol_loss, tol_grad = TOLERANCE[case.dtype]
    result = {"check_err": err, "check_grad_err": None}
    if not err <= tol_loss:
        raise Mismatch(f"loss {float(out.detach()):.6g} vs reference {float(ref.detach()):.6g} on {d} (rel. error {err:.2g})")
    if case.phase == "forward+backward":
        out.backward()
        ref.backward()
        gerr = 0.0
        for f, r in zip(feats, ref_feats):
            if f.grad is None:
                raise Mismatch("no gradient reached the inputs")
            scale = float(r.grad.abs().max()) or 1.0
            gerr = max(gerr, float((f.grad.double() - r.grad).abs().max()) / scale)
        result["check_grad_err"] = gerr
        if not gerr <= tol_grad:
            raise Mismatch(f"gradient rel. error {gerr:.2g} against the reference on {d}")
    return result


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return any(s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                  "not enough memory", "error code 12"))


def _percentile(sorted_xs: list, q: float) -> float:
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_case(case: Case, fn, mem_cap_bytes: int) -> dict:
    """Build the full-size inputs and time fn; returns times and memory (see the module docstring)."""
    import torch
    dtype = getattr(torch, case.dtype)
    cuda = case.device.startswith("cuda")
    feats, meta = make_inputs(case.loss, case.d, dtype, case.device)
    backward = case.phase == "forward+backward"

    def step():
        for f in feats:
            f.grad = None
        out = fn(*feats, **meta)
        if backward:
            out.backward()
        _sync(case.device)
        return out

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass
        if mem_cap_bytes > 0:
            import resource
            vm = _status_kb("VmSize") * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + mem_cap_bytes, resource.RLIM_INFINITY))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS") * 1024

    budget = case.budget_s
    t_start = time.perf_counter()
    out = None
    times: list[float] = []
    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    warm = first
    if case.warmup and first <= budget / 2:
        while len(times) < case.max_reps:
            elapsed = sum(times)
            if len(times) >= MIN_REPS and elapsed >= MIN_TIME:
                break
            last = times[-1] if times else first
            if times and time.perf_counter() - t_start + last > budget * 0.9:
                break
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
    reps = len(times)
    if not times:
        times = [first]
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        extra = peak - base
    else:
        peak = _status_kb("VmHWM") * 1024
        extra = peak - base
    xs = sorted(times)
    return dict(median_s=_percentile(xs, 0.5), p20_s=_percentile(xs, 0.2), p80_s=_percentile(xs, 0.8),
                reps=reps, warmup_s=warm, peak_mb=peak / 2**20, extra_mb=extra / 2**20,
                loss_value=float(out.detach()))


def run(case: Case, mem_cap_gb: float) -> dict:
    """Everything the child does; never raises: status is ok / mismatch / out of memory / error."""
    import torch
    res: dict = {"status": "ok", "detail": ""}
    try:
        if case.device.startswith("cuda") and not torch.cuda.is_available():
            return {"status": "unavailable", "detail": "no CUDA device"}
        if case.impl == "triton":
            from macl_kernels.triton import triton_unavailable_reason
            reason = triton_unavailable_reason(torch.device(case.device))
            if reason:
                return {"status": "unavailable", "detail": reason}
        fn = make_fn(case.loss, case.impl)
        res.update(check_small(case, fn))
    except Mismatch as e:
        return {"status": "mismatch", "detail": str(e)}
    except Exception as e:
        return {"status": "error", "detail": f"check: {type(e).__name__}: {str(e).strip()[:300]}"}
    if case.impl == "compile":
        torch._dynamo.reset()
    watchdog = threading.Timer(case.budget_s, _too_slow, args=(case.budget_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        res.update(time_case(case, fn, int(mem_cap_gb * 2**30)))
    except Exception as e:
        if _is_oom(e):
            res.update(status="out of memory", detail=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        else:
            res.update(status="error", detail=f"{type(e).__name__}: {str(e).strip()[:300]}")
    finally:
        watchdog.cancel()
    return res


def _too_slow(budget: float) -> None:
    sys.stdout.write(json.dumps({"status": "too slow", "detail": f"over the case budget of {budget:g} s"}) + "\n")
    sys.stdout.flush()
    os._exit(3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run one benchmark case (used by benchmarks.sweep)")
    ap.add_argument("case", help="the case as JSON (Case.to_json)")
    ap.add_argument("--mem-cap-gb", type=float, default=16.0)
    a = ap.parse_args(argv)
    case = Case.from_json(json.loads(a.case))
    print(json.dumps(run(case, a.mem_cap_gb)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
