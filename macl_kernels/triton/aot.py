"""Ahead-of-time compile of every shipped Triton configuration, with no GPU, and a resource report.

For each `shipped_configs()` entry and each target (sm_80, sm_90) this runs
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`, writes the
cubin to a temporary file and reads Triton's bundled `cuobjdump`: registers, stack, local memory (spills)
and shared memory from `--dump-resource-usage`, and counts of HMMA / HGMMA / LDL / STL in `--dump-sass`.

TRITON_INTERPRET: our kernels are plain functions wrapped at call time (`kernels_fwd.kernel`), so they
are real JITFunctions here whatever the environment; but Triton decorates its *own* library
(`tl.sum`, `tl.max`, `cdiv`, ...) at import time, so a process that imported triton with
TRITON_INTERPRET=1 (tests/conftest.py sets it for the whole session) cannot compile at all. `run_report`
therefore compiles in *spawned* worker processes started with TRITON_INTERPRET removed from their
environment; `compile_one` is only safe in a process that imported triton without it.

    python -m macl_kernels.triton.aot [--csv PATH] [--arch 80 90] [--jobs N] [--full]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import ShippedConfig, shipped_configs

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: kernel switch sets every configuration is compiled with (the full matrix; the fast test rotates through
#: them): the three positive rules, a learnable τ (scale read from memory, dq also sums ∂L/∂s), key masks,
#: exclude_self. "Keys without grad" launches fwd + dq only, which these sets already cover.
FLAG_SETS = {
    "label-mask-self": {"RULE": 1, "EXCLUDE_SELF": True, "HAS_KV": True, "SCALE_IN_MEM": False, "WITH_DS": False},
    "index-learn-tau": {"RULE": 0, "EXCLUDE_SELF": False, "HAS_KV": False, "SCALE_IN_MEM": True, "WITH_DS": True},
    "radius-learn-tau-mask": {"RULE": 2, "EXCLUDE_SELF": True, "HAS_KV": True, "SCALE_IN_MEM": True,
                              "WITH_DS": True},
}
FLAG_NAMES = tuple(FLAG_SETS)


@dataclass
class AotRow:
    """One compiled (configuration, target): resources from cuobjdump; error is None when it compiled."""
    phase: str
    dtype: str
    precision: str
    D: int
    size_class: str
    arch: int
    flags: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DOUT: int
    num_warps: int
    num_stages: int
    maxnreg: Optional[int]
    default: bool = True
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    hmma: int = 0
    hgmma: int = 0
    ldl: int = 0
    stl: int = 0
    key_loop_drains: Optional[bool] = None   # an async_wait {num = 0} inside a loop of the TTGIR
    key_loop_async: int = 0                  # async global->shared copies inside loops (pipelining)
    compile_s: float = 0.0
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        """Register spills: cuobjdump reports them as STACK (and LOCAL) bytes and LDL/STL instructions."""
        return self.stack != 0 or self.local != 0 or self.ldl > 0 or self.stl > 0

    @property
    def smem_ok(self) -> bool:
        """Shared memory within the arch's per-block maximum (`config.SMEM_LIMIT`)."""
        from .config import SMEM_LIMIT
        return 0 <= self.shared <= SMEM_LIMIT.get(self.arch, SMEM_LIMIT[80])


def expects_wgmma(r: AotRow) -> bool:
    """16-bit sm_90 kernel whose MMA row block is ≥ 64 (wgmma's M): fwd / dq with BLOCK_M ≥ 64, dk with
    BLOCK_N ≥ 64 (its output rows are keys). Those must issue HGMMA; smaller blocks use HMMA (mma.sync)."""
    own = r.BLOCK_N if r.phase == "dk" else r.BLOCK_M
    return r.arch == 90 and r.dtype in ("fp16", "bf16") and own >= 64


def cuobjdump_path() -> str:
    """Path of the cuobjdump shipped inside Triton's NVIDIA backend."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(entry: ShippedConfig, precision: str, flags: str = FLAG_NAMES[0]) -> tuple:
    """(fn, signature, constexprs, attrs) of one shipped configuration and flag set, as the JIT specialises it."""
    from . import kernels_bwd, kernels_fwd
    from .autograd import _dz_scale
    t = _TL_DTYPE[entry.dtype]
    f = dict(FLAG_SETS[flags])
    meta = "*fp32" if f["RULE"] == 2 else "*i32"
    head = {"Q": f"*{t}", "K": f"*{t}", "QM": meta, "KM": meta}
    strides = {"stride_qg": "i32", "stride_qn": "i32", "stride_qd": "constexpr",
               "stride_kg": "i32", "stride_km": "i32", "stride_kd": "constexpr",
               "stride_og": "i32", "stride_on": "constexpr"}
    scalars = {"scale": "fp32", "threshold": "fp32", "N": "i32", "M": "i32"}
    with_ds = f.pop("WITH_DS")
    if entry.phase == "fwd":
        fn = kernels_fwd.contrast_fwd_kernel
        sig = {**head, "KV": "*u8", "S_PTR": "*fp32", "CNT": "*i32", "LOSS": "*fp32", "LSE": "*fp32",
               **scalars, **strides}
        extra = {}
    else:
        rows_phase = entry.phase in ("dq", "dsym")    # dsym: the dq kernel with SYM (self-contrast)
        fn = kernels_bwd.contrast_dq_kernel if rows_phase else kernels_bwd.contrast_dk_kernel
        out = "DQ" if rows_phase else "DK"
        row = "stride_dn" if rows_phase else "stride_dm"
        sig = {**head, "KV": "*u8", "S_PTR": "*fp32", "GMAX": "*fp32", "LSE": "*fp32", "CNT": "*i32",
               "GRAD": "*fp32", out: f"*{t}", "DS": "*fp32", **scalars,
               **strides, "stride_dg": "i32", row: "i32", "stride_dd": "constexpr"}
        extra = {"DZ_SCALE": _dz_scale(entry.dtype)}
        if rows_phase:
            extra["WITH_DS"] = with_ds
            extra["SYM"] = entry.phase == "dsym"
        if entry.phase in ("dk", "dsym"):
            sig["CNT"] = "*fp32"     # WY_i (kernels_bwd: dk and the dq kernel with SYM)
        if entry.phase == "dsym":    # launched without the scale-gradient sum (autograd.TritonContrast)
            extra["WITH_DS"] = False
    const = {"stride_qd": 1, "stride_kd": 1, "stride_on": 1, "stride_dd": 1, "D": entry.D,
             "INPUT_PRECISION": precision, "UPCAST_DOT": False, **f, **extra, **entry.config.constexprs()}
    jit = kernels_fwd.kernel(fn, interpret=False)
    const = {k: v for k, v in const.items() if k in jit.arg_names}
    sig = {k: v for k, v in sig.items() if k in jit.arg_names}
    for k in const:
        sig[k] = "constexpr"
    # pointers and the group/row strides are multiples of 16 (D is), as the JIT would specialise them
    hinted = [n for n, ty in sig.items() if ty.startswith("*")] + \
        [n for n in ("stride_qg", "stride_qn", "stride_kg", "stride_km", "stride_dg", "stride_dn", "stride_dm")
         if n in sig and entry.D % 16 == 0]
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    sig = {n: sig[n] for n in jit.arg_names}
    return jit, sig, const, attrs


def loop_pipelining(ttgir: str) -> tuple[bool, int]:
    """(drains, n_async) of the loops of a TTGIR module: drains is True when an `async_wait {num = 0}` (a full
    drain of the in-flight async copies) sits inside an scf.for body; n_async counts the async global->shared
    copies issued inside loop bodies (0: the loop is not software-pipelined)."""
    stack, drains, n_async = [], False, 0
    for line in ttgir.splitlines():
        body = line.lstrip()
        ind = len(line) - len(body)
        while stack and ind <= stack[-1] and body.startswith("}"):
            stack.pop()
            break
        if stack:
            if "async_wait" in body and "num = 0 " in body.replace("num = 0:", "num = 0 "):
                drains = True
            if "async_copy_global_to_local" in body or "async_tma_copy_global_to_local" in body:
                n_async += 1
        if "scf.for" in body and body.rstrip().endswith("{") or ("scf.for" in body and "iter_args" in body):
            stack.append(ind)
    return drains, n_async


def _parse(resource: str, sass: str) -> dict:
    def field(name):
        m = re.search(rf"\b{name}:(\d+)", resource)
        return int(m.group(1)) if m else -1
    return {"registers": field("REG"), "stack": field("STACK"), "local": field("LOCAL"),
            "shared": field("SHARED"), "hmma": len(re.findall(r"\bHMMA\.", sass)),
            "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "ldl": len(re.findall(r"\bLDL\b", sass)),
            "stl": len(re.findall(r"\bSTL\b", sass))}


def compile_one(entry: ShippedConfig, arch: int, precision: Optional[str] = None,
                flags: str = FLAG_NAMES[0]) -> AotRow:
    """Compile one configuration for sm_`arch` and read its resources. Never raises: see `AotRow.error`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    precision = precision or entry.precision
    c = entry.config
    row = AotRow(entry.phase, _TL_DTYPE[entry.dtype], precision, entry.D, entry.size_class, arch, flags,
                 c.BLOCK_M, c.BLOCK_N, c.BLOCK_D, c.BLOCK_DOUT, c.num_warps, c.num_stages, c.maxnreg, entry.default)
    t0 = time.perf_counter()
    try:
        fn, sig, const, attrs = signature(entry, precision, flags)
        ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                            options=c.launch_options())
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", "--dump-sass", path],
                                 capture_output=True, text=True, check=True).stdout
        for k, v in _parse(out, out).items():
            setattr(row, k, v)
        row.shared = int(ck.metadata.shared)   # Triton's shared memory is dynamic: cuobjdump says 0
        row.key_loop_drains, row.key_loop_async = loop_pipelining(ck.asm["ttgir"])
    except Exception as e:  # reported per row; the test asserts error is None
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    row.compile_s = time.perf_counter() - t0
    return row


def _task(args):
    return compile_one(*args)


def jobs_for(archs: Sequence[int] = (80, 90), entries: Optional[Sequence[ShippedConfig]] = None,
             tf32: bool = True, full: bool = False) -> list[tuple]:
    """(entry, arch, precision, flags) for every shipped config of `archs` (each entry for its own table's arch;
    TF32 entries only when `tf32`).

    full: every flag set of `FLAG_SETS` for every entry (the full matrix); otherwise entry i is compiled with
    flag set i mod 3, so every flag set meets every phase, dtype and D class across the list."""
    entries = shipped_configs() if entries is None else entries
    out = []
    for i, e in enumerate(x for x in entries if tf32 or x.precision != "tf32"):
        sets = FLAG_NAMES if full else (FLAG_NAMES[i % len(FLAG_NAMES)],)
        out += [(e, a, e.precision, f) for f in sets for a in archs if a == e.arch]
    return out


def run_report(archs: Sequence[int] = (80, 90), entries: Optional[Sequence[ShippedConfig]] = None,
               jobs: Optional[int] = None, tf32: bool = True, full: bool = False) -> list[AotRow]:
    """Compile every (configuration, arch, precision, flag set) of `jobs_for` and return one `AotRow` each.

    Identical compiles (same kernel, dtype, D, constexprs, launch options, flags) run once. Compiles run in
    `jobs` spawned worker processes (default: CPU count) whose environment has no TRITON_INTERPRET (see the
    module docstring), so this works from an interpreter-mode test session.
    """
    import multiprocessing as mp
    tasks = jobs_for(archs, entries, tf32, full)
    key = lambda t: (t[0].phase, t[0].dtype, t[0].D, t[0].config, t[1], t[2], t[3])  # noqa: E731
    unique = list({key(t): t for t in tasks}.values())
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(unique)))
    saved = os.environ.pop("TRITON_INTERPRET", None)   # spawned children copy the environment at start
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:
            done = pool.map(_task, unique, chunksize=1)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    by_key = dict(zip((key(t) for t in unique), done))
    return [dataclasses.replace(by_key[key(t)], size_class=t[0].size_class, default=t[0].default) for t in tasks]


def format_table(rows: Sequence[AotRow]) -> str:
    """Fixed-width text table of the rows."""
    cols = ["phase", "dtype", "precision", "D", "size_class", "arch", "flags", "default", "BLOCK_M", "BLOCK_N",
            "BLOCK_D", "BLOCK_DOUT", "num_warps", "num_stages", "maxnreg", "registers", "stack", "local", "shared",
            "hmma", "hgmma", "ldl", "stl", "key_loop_drains", "error"]
    table = [cols] + [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(x[i]) for x in table) for i in range(len(cols))]
    return "\n".join("  ".join(x[i].rjust(widths[i]) for i in range(len(cols))) for x in table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="write the rows to this CSV file")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default 80 90)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--no-tf32", action="store_true", help="skip the TF32 variants of fp32")
    ap.add_argument("--full", action="store_true", help="every flag set for every configuration")
    a = ap.parse_args(argv)
    rows = run_report(a.arch, jobs=a.jobs, tf32=not a.no_tf32, full=a.full)
    print(format_table(rows))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(AotRow)])
            w.writeheader()
            w.writerows(dataclasses.asdict(r) for r in rows)
    bad = [r for r in rows if r.error or r.spills or not r.smem_ok]
    print(f"{len(rows)} rows, {sum(r.error is not None for r in rows)} failed, "
          f"{sum(r.spills for r in rows)} with spills, {sum(not r.smem_ok for r in rows)} over shared memory",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
