"""What the compiled kernels execute: main-loop counts from SASS / PTX / TTGIR, and a per-SM cycle model.

For each shipped large-tile configuration (16-bit and TF32, D ∈ `REPORT_D`, sm_80 and sm_90) this compiles the
kernel ahead of time (`aot.signature`, Triton's ptxas), disassembles the cubin with Triton's bundled `cuobjdump`,
finds the main loop by its backward branch (the loop holding the tensor-core instructions) and counts, per warp
and per iteration: MMA instructions by shape, MUFU, shared-memory loads / stores / async copies and their bytes,
all issued instructions. From the warps that execute them (HMMA: every warp; HGMMA: every warpgroup) it derives

    executed MACs / iteration = Σ_shape count · M·N·K · executors,
    executed GEMM units       = executed MACs / (BLOCK_M · BLOCK_N · D),
    exp passes                = MUFU.EX2 · num_warps / (BLOCK_M · BLOCK_N),

so a second warpgroup that repeats the first's z tile shows as 2 units where 1 is useful (the source loop cannot
show it). The TTGIR gives the MMA layouts (`warpsPerCTA`, instruction shape) and the loop's async-copy waits (an
`async_wait {num = 0}` in the loop is a full drain); the PTX the `wgmma` / `mma.sync` count.

Cycle model (one SM of an H100 SXM, `H100_SM`): per CTA iteration
    tensor = executed MACs / MMA rate (HGMMA 2048 MAC/clk for 16-bit, 1024 for TF32; mma.sync `HMMA_FRACTION`
             of that), smem = shared-memory bytes (LDSM / LDS / STS / LDGSTS, and the wgmma operands read from
             shared memory) / 128 B/clk, mufu = MUFU lanes / 16 per clk, issue = instructions · warps / 4;
    with c CTAs resident per SM (shared memory, registers), a round of one iteration of each costs
    max(c · max(tensor, smem, mufu, issue), max(tensor, smem) + max(mufu, issue)):
the second term is one CTA's own chain, since every loop here waits for its MMAs before the softmax (no ping-pong).
Prediction for a shape: waves · iterations · round / clock, waves = ⌈programs / (132 · c)⌉. It is a model of the
compiled code, not a measurement: latencies, L2 / HBM and the prologue / epilogue are not in it.

Compiling every configuration costs CPU minutes: `load_or_build` caches the per-config analysis in
`benchmarks/results/sass_report.json` (keyed by the configuration, the triton version and a hash of the kernel
sources, `kernel_source_hash`).

    python -m macl_kernels.triton.sass_model [--arch 80 90] [--rebuild] [--jobs N] [--all]   (the tables)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

#: feature widths of the report (the issue's acceptance table)
REPORT_D = (64, 128, 256, 512)
#: default cache of the analysis (relative to the repository root)
CACHE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "sass_report.json")
#: one H100 SXM5 SM: 132 SMs at the 1.83 GHz the datasheet's dense peaks use (989 TFLOP/s bf16 = 132 · 4096 · 1.83e9)
H100_SM = {"sms": 132, "clock_hz": 1.83e9, "hgmma_mac_per_clk": {"16bit": 2048, "tf32": 1024},
           "smem_bytes_per_clk": 128, "mufu_per_clk": 16, "issue_per_clk": 4, "smem_bytes": 233472,
           "regs": 65536, "max_warps": 64}
#: mma.sync (HMMA) throughput on sm_90 relative to wgmma: an assumption (microbenchmarks report ~60–70%)
HMMA_FRACTION = 0.625
#: useful GEMMs per z tile of each kernel (fwd: z; dq / dk / dsym: z and the gradient GEMM)
USEFUL_UNITS = {"fwd": 1, "dq": 2, "dk": 2, "dsym": 2}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


@dataclass
class LoopCounts:
    """Per-warp instruction counts of one iteration of the main loop (inner loops counted × their trips)."""
    start: int = 0
    end: int = 0
    mma: dict = field(default_factory=dict)      # 'HGMMA.64x64x16' / 'HMMA.16816' -> count per warp
    hgmma_macs: int = 0                          # MACs of the HGMMA instructions (each is one warpgroup's)
    hmma_macs: int = 0                           # MACs of the HMMA instructions (each is one warp's)
    hgmma: int = 0
    hmma: int = 0
    ex2: int = 0
    mufu: int = 0
    ldsm: int = 0
    lds: int = 0
    sts: int = 0
    ldgsts: int = 0
    smem_bytes: int = 0                          # per warp: LDSM/LDS/STS/LDGSTS bytes; HGMMA operands per warpgroup
    instructions: int = 0
    depbar: list = field(default_factory=list)   # DEPBAR.LE SB0, n values in the loop (async-copy waits)
    nested: int = 0                              # inner backward branches inside the main loop


def _hmma_shape(op: str) -> tuple[int, int, int]:
    """M, N, K of an HMMA opcode: HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8."""
    tag = op.split(".")[1]
    if tag == "16816":
        return 16, 8, 16
    if tag == "1688":
        return 16, 8, 8
    if tag == "884":
        return 8, 8, 4
    raise ValueError(f"unknown HMMA shape {op!r}")


def _smem_bytes(op: str) -> int:
    """Shared-memory bytes one warp moves with a LDSM / LDS / STS / LDGSTS instruction."""
    if op.startswith("LDSM"):
        n = re.search(r"\.(\d)$", op) or re.search(r"M88\.(\d)", op) or re.search(r"MT88\.(\d)", op)
        return 128 * (int(n.group(1)) if n else 1)
    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    w = width.group(1) if width else "32"
    per_lane = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[w]
    return 32 * per_lane


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operand text) of every instruction of a cuobjdump --dump-sass listing."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def loops(instrs: Sequence[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(target, branch address) of every backward branch: the loops of the listing."""
    out = []
    for addr, op, text in instrs:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", text)
            if t and int(t.group(1), 16) < addr:
                out.append((int(t.group(1), 16), addr))
    return out


#: shared-memory instructions counted by opcode prefix (a LoopCounts field each), LDSM tested before LDS
_SMEM_OPS = ("LDSM", "LDS", "STS", "LDGSTS")


def count_loop(instrs, lo: int, hi: int, inner_trips: int = 1) -> LoopCounts:
    """Counts of the loop body [lo, hi]; instructions of loops nested inside count `inner_trips` times."""
    inner = [(a, b) for a, b in loops(instrs) if lo <= a and b <= hi and (a, b) != (lo, hi)]
    c = LoopCounts(start=lo, end=hi, nested=len(inner))
    for addr, op, text in instrs:
        if not lo <= addr <= hi:
            continue
        w = inner_trips if any(a <= addr <= b for a, b in inner) else 1
        c.instructions += w
        if op.startswith("HGMMA"):
            m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?", op)   # fp16: no input suffix
            M, N, K = int(m.group(1)), int(m.group(2)), int(m.group(3))
            e = 4 if m.group(4) == "TF32" else 2
            key = f"HGMMA.{M}x{N}x{K}.{m.group(4) or 'F16'}"
            c.mma[key] = c.mma.get(key, 0) + w
            c.hgmma_macs += w * M * N * K
            c.hgmma += w
            ops = [x.strip() for x in text.split(",")]
            a_smem = len(ops) > 1 and ops[1].startswith("gdesc")
            # operand bytes per warpgroup, spread over its 4 warps (smem_bytes is per warp)
            c.smem_bytes += w * (N * K * e + (M * K * e if a_smem else 0)) // 4
        elif op.startswith("HMMA"):
            M, N, K = _hmma_shape(op)
            key = f"HMMA.{op.split('.')[1]}.{op.split('.')[-1]}"
            c.mma[key] = c.mma.get(key, 0) + w
            c.hmma_macs += w * M * N * K
            c.hmma += w
        elif op.startswith("MUFU"):
            c.mufu += w
            c.ex2 += w * op.startswith("MUFU.EX2")
        elif op.startswith(_SMEM_OPS):
            name = next(p for p in _SMEM_OPS if op.startswith(p))     # LDSM before LDS
            setattr(c, name.lower(), getattr(c, name.lower()) + w)
            c.smem_bytes += w * _smem_bytes(op)
        elif op.startswith("DEPBAR"):
            n = re.search(r"SB0,\s*0x([0-9a-f]+)", text)
            if n:
                c.depbar.append(int(n.group(1), 16))
    return c


def main_loop(sass: str, inner_trips: int = 1) -> LoopCounts:
    """The main loop: the outermost backward-branch loop holding the most tensor-core instructions."""
    instrs = parse_sass(sass)
    best = None
    for lo, hi in loops(instrs):
        c = count_loop(instrs, lo, hi, inner_trips)
        if best is None or (c.hgmma + c.hmma, hi - lo) > (best.hgmma + best.hmma, best.end - best.start):
            best = c
    if best is None:
        raise ValueError("no backward branch in the SASS listing: no loop")
    return best


def ttgir_loop(ttgir: str) -> dict:
    """MMA layouts and the main loop's async-copy waits from the TTGIR.

    Returns dict(mma_layouts: ['v3 [8,1] 16x32x16', ...], wait_nums: [num of every async_wait inside an
    scf.for body], async_copies: async global→shared copies in loop bodies, dot_waits: pendings of every
    warp_group_dot_wait inside a loop)."""
    lay = [f"v{m.group(1)} [{m.group(3)}] {m.group(4).replace(', ', 'x')}" for m in re.finditer(
        r"nvidia_mma<\{versionMajor = (\d), versionMinor = (\d), warpsPerCTA = \[([\d, ]+)\], instrShape = \[([\d, ]+)\]",
        ttgir)]
    lay = [x.replace(", ", ",") for x in lay]
    stack, waits, copies, dwaits = [], [], 0, []
    for line in ttgir.splitlines():
        body = line.lstrip()
        ind = len(line) - len(body)
        if stack and ind <= stack[-1] and body.startswith("}"):
            stack.pop()
            continue
        if stack:
            m = re.search(r"ttg\.async_wait.*\{num = (\d+)", body)
            if m:
                waits.append(int(m.group(1)))
            if "async_copy_global_to_local" in body or "async_tma_copy_global_to_local" in body:
                copies += 1
            m = re.search(r"warp_group_dot_wait.*pendings = (\d+)", body)
            if m:
                dwaits.append(int(m.group(1)))
        if re.search(r"= scf\.for ", body) or body.startswith("scf.for "):
            stack.append(ind)
    return dict(mma_layouts=lay, wait_nums=waits, async_copies=copies, dot_waits=dwaits)


def ptx_mma(ptx: str) -> dict:
    """Counts of `wgmma.mma_async` by shape and of `mma.sync` in the PTX."""
    out = {}
    for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    out["mma.sync"] = len(re.findall(r"\bmma\.sync\.aligned", ptx))
    return out


@dataclass
class KernelReport:
    """One compiled (configuration, arch): resources, main-loop counts and what they mean per z tile."""
    phase: str
    dtype: str
    precision: str
    D: int
    arch: int
    flags: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DOUT: int
    num_warps: int
    num_stages: int
    default: bool = True
    registers: int = -1
    spill_bytes: int = 0            # STACK + LOCAL bytes (cuobjdump) — 0 means no spills
    shared: int = -1
    loop: dict = field(default_factory=dict)        # LoopCounts as a dict
    ttgir: dict = field(default_factory=dict)
    ptx: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def key(self) -> str:
        return (f"{self.phase}/{self.dtype}/{self.precision}/D{self.D}/sm{self.arch}/{self.flags}/"
                f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_D}/{self.BLOCK_DOUT}/w{self.num_warps}/s{self.num_stages}")

    @property
    def executed_macs(self) -> float:
        """MACs one CTA executes per main-loop iteration: HGMMA × warpgroups + HMMA × warps."""
        lp = self.loop
        return lp["hgmma_macs"] * max(1, self.num_warps // 4) + lp["hmma_macs"] * self.num_warps

    @property
    def tile_macs(self) -> float:
        """One z tile's GEMM: BLOCK_M · BLOCK_N · D MACs (one GEMM unit per iteration)."""
        return float(self.BLOCK_M * self.BLOCK_N * self.D)

    @property
    def units(self) -> float:
        """Executed GEMM units of the kernel (executed MACs per iteration over one z tile's)."""
        return self.executed_macs / self.tile_macs

    @property
    def ratio(self) -> float:
        """Executed ÷ useful MMA work (useful: 1 unit forward, 2 per backward kernel, dsym included)."""
        return self.units / USEFUL_UNITS[self.phase]

    @property
    def exp_passes(self) -> float:
        """MUFU.EX2 lanes per iteration over the z tile's elements (1 = one exponential per element)."""
        return self.loop["ex2"] * self.num_warps * 32 / (self.BLOCK_M * self.BLOCK_N)

    @property
    def drains(self) -> bool:
        """A full async-copy drain (async_wait {num = 0}) inside a loop of the TTGIR."""
        return 0 in self.ttgir.get("wait_nums", [])

    @property
    def pipelined(self) -> bool:
        """Async copies issued inside the loop and no full drain there."""
        return self.ttgir.get("async_copies", 0) > 0 and not self.drains


def _compile(task) -> KernelReport:
    """Compile one (ShippedConfig, arch, flags) and analyse it (runs in a worker without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .aot import _TL_DTYPE, cuobjdump_path, signature
    entry, arch, flags = task
    c = entry.config
    rep = KernelReport(entry.phase, _TL_DTYPE[entry.dtype], entry.precision, entry.D, arch, flags, c.BLOCK_M,
                       c.BLOCK_N, c.BLOCK_D, c.BLOCK_DOUT, c.num_warps, c.num_stages, entry.default)
    try:
        fn, sig, const, attrs = signature(entry, entry.precision, flags)
        ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                            options=c.launch_options())
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", "--dump-sass", path],
                                 capture_output=True, text=True, check=True).stdout
        res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
        rep.registers = res.get("REG", -1)
        rep.spill_bytes = res.get("STACK", 0) + res.get("LOCAL", 0) + 4 * len(re.findall(r"\b(?:LDL|STL)\b", out))
        rep.shared = int(ck.metadata.shared)
        n_d = -(-entry.D // c.BLOCK_D)
        rep.loop = dataclasses.asdict(main_loop(out, inner_trips=n_d))
        rep.ttgir = ttgir_loop(ck.asm["ttgir"])
        rep.ptx = ptx_mma(ck.asm["ptx"])
    except Exception as e:  # reported per row; the test asserts error is None
        rep.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return rep


def report_entries(archs: Sequence[int] = (80, 90), dims: Sequence[int] = REPORT_D, defaults_only: bool = False):
    """(ShippedConfig, arch, flags) of every large-tile 16-bit / TF32 candidate at the report's D values."""
    import torch

    from .aot import FLAG_NAMES
    from .config import shipped_configs
    out = []
    for e in shipped_configs():
        if e.size_class != "large" or e.D not in dims or (e.dtype == torch.float32 and e.precision != "tf32"):
            continue
        if defaults_only and not e.default:
            continue
        for a in archs:
            if e.arch == a:
                out.append((e, a, FLAG_NAMES[0]))
    return out


def _version() -> str:
    import triton
    return triton.__version__


def kernel_source_hash() -> str:
    """sha256 (16 hex digits) of what a compiled row depends on besides its configuration: the kernel sources
    and `aot.py` (signatures, flag sets). The cache holds rows only for the hash it was built with, so an
    edited kernel can never be answered with the analysis of the old one."""
    import hashlib
    h = hashlib.sha256()
    for name in ("kernels_fwd.py", "kernels_bwd.py", "aot.py"):
        with open(os.path.join(os.path.dirname(__file__), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build(tasks, jobs: Optional[int] = None) -> list[KernelReport]:
    """Compile and analyse `tasks` in spawned workers whose environment has no TRITON_INTERPRET (see aot.py)."""
    import multiprocessing as mp
    if not tasks:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:
            return pool.map(_compile, tasks, chunksize=1)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _from_dict(d: dict) -> KernelReport:
    return KernelReport(**{f.name: d[f.name] for f in dataclasses.fields(KernelReport) if f.name in d})


def load_or_build(tasks=None, path: str = CACHE, rebuild: bool = False, jobs: Optional[int] = None,
                  write: bool = True) -> list[KernelReport]:
    """Reports of `tasks` (default `report_entries()`): cached ones from `path`, the rest compiled (and cached)."""
    tasks = report_entries() if tasks is None else tasks
    cache = {}
    if os.path.exists(path) and not rebuild:
        with open(path) as f:
            blob = json.load(f)
        if blob.get("triton") == _version() and blob.get("kernels") == kernel_source_hash():
            cache = {r["key"]: _from_dict(r) for r in blob["rows"]}
    from .aot import _TL_DTYPE
    keyed = []
    for e, a, fl in tasks:
        r = KernelReport(e.phase, _TL_DTYPE[e.dtype], e.precision, e.D, a, fl, e.config.BLOCK_M, e.config.BLOCK_N, e.config.BLOCK_D,
                         e.config.BLOCK_DOUT, e.config.num_warps, e.config.num_stages, e.default)
        keyed.append(r.key)
    todo = [t for t, k in zip(tasks, keyed) if k not in cache or cache[k].error]
    for r in build(todo, jobs):
        cache[r.key] = r
    out = []
    for (e, _, _), k in zip(tasks, keyed):
        out.append(dataclasses.replace(cache[k], default=e.default))
    if write and todo:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = [{**dataclasses.asdict(r), "key": r.key} for r in cache.values()]
        with open(path, "w") as f:
            json.dump({"triton": _version(), "kernels": kernel_source_hash(),
                       "rows": sorted(rows, key=lambda r: r["key"])}, f, indent=1)
    return out
