"""The cases of the one-shot GPU check (`benchmarks/gpu_check.py`, docs/gpu_check.md).

Each case is a `CheckCase` whose `run()` returns the fields of its table row; nothing here runs at import
or while building the list, so `--dry-run` lists the cases on a machine without a GPU. Three sections:

- "test": Triton vs the float64 reference (KERNELS.md §5: |ours − truth| ≤ 2·|same-dtype reference − truth|
  + atol for loss rows, LSE, dq, dk, dτ; counts exact) for fp32 / TF32 / fp16 / bf16 and the three positive
  rules with a learnable τ, plus keys without grad, a float τ, q is k, many small groups, in-core
  normalisation, the NaN case (every logit ≈ −150), the autocast operand dtype and a MACL forward+backward.
  The call under test (forward and backward) runs under `torch.cuda.set_sync_debug_mode("error")`, after one
  unguarded warm-up call (JIT compile, autotuning);
- "speed": forward and forward+backward of the core (index rule, pre-normalised bf16 features, τ = 0.1) at
  N = M ∈ {4096, 16384, 65536}, D ∈ {128, 256, 512}: Triton, naive PyTorch and torch.compile of naive;
- "macl-step": one MACL pre-training step under autocast (the trainer's default fp16 with a GradScaler) with
  impl="triton" and impl="torch".
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

SPEED_N = (16384, 4096, 65536)          # run order: the target shape first
SPEED_D = (128, 256, 512)
PHASES = ("forward", "forward+backward")
#: k is q (nt_xent, sup_con, MACL's terms): the forward and the one 'dsym' backward kernel; Triton rows only
SELF_PHASE = "self-contrast forward+backward"
NOMINAL_FLOP = {"forward": 2.0, "forward+backward": 8.0, SELF_PHASE: 8.0}   # × N·M·D, the effective TFLOP/s
TEST_DTYPES = ("float32", "tf32", "float16", "bfloat16")
RULES = ("index", "label", "radius")
ATOL = {"float32": 1e-5, "tf32": 1e-3, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass
class CheckCase:
    section: str                      # "test" | "speed" | "macl-step"
    name: str
    impl: str                         # "triton" | "naive" | "compile" | "torch"
    run: Callable[[], dict]           # returns row fields (status, ms, tflops, ...); raises on failure
    est_s: float                      # rough wall time on an H100, for the budget and the dry run
    priority: int = 0                 # lower runs first
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def sync_guard(device: str = "cuda"):
    """Raise on any host-device synchronisation torch makes inside the block (nothing to guard on CPU)."""
    import torch
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def matmul_precision(p: str):
    import torch
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def ceiling_tflops(N: int, M: int, D: int, phase: str) -> float:
    """The Triton kernels' predicted effective TFLOP/s from the compiled-code model (`benchmarks/roofline.py`
    → `macl_kernels.triton.sass_model`: the sm_90 bf16 default configurations' SASS, H100 SXM; the H200
    has the same tensor-core peak)."""
    from benchmarks import roofline
    return roofline.compiled_phase(N, M, D, "bfloat16", phase)["effective_tflops"]


def time_cuda(fn: Callable[[], None], target_s: float = 0.3, max_iters: int = 200):
    """(device seconds per call, host enqueue seconds per call, extra peak bytes) of fn after one warm-up.

    Device time: one pair of CUDA events around n back-to-back calls (n from the warm-up's wall time so that
    the window is ~target_s, 3 ≤ n ≤ max_iters), divided by n: the GPU is kept busy, so Python's enqueue
    overlaps the kernels and is not in the figure unless it is the bottleneck. Host time: the wall time of
    enqueuing the same n calls (before the closing synchronise) over n, reported beside it."""
    import torch
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    n = max(3, min(max_iters, int(target_s / max(first, 1e-6))))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    h0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - h0) / n
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / n, host, torch.cuda.max_memory_allocated() - base


# --------------------------------------------------------------------------------- correctness tests

def _rule_kwargs(rule, G, N, M, q_is_k, gen, device):
    import torch
    if rule == "index":
        return dict(pos_index=torch.randint(0, M, (G, N), generator=gen).to(device))
    if rule == "label":
        ql = torch.randint(0, 8, (G, N), generator=gen)
        return dict(q_labels=ql.to(device), k_labels=None if q_is_k else torch.randint(0, 8, (G, M), generator=gen).to(device))
    qp = torch.rand(G, N, generator=gen)
    return dict(q_positions=qp.to(device), threshold=0.05,
                k_positions=None if q_is_k else torch.rand(G, M, generator=gen).to(device))


def run_core_test(rule="label", dtype="bfloat16", G=1, N=1000, M=1537, D=123, learn_tau=True, k_grad=True,
                  q_is_k=False, normalize=False, nan_case=False, seed=0, device="cuda") -> dict:
    """Triton vs the float64 reference on one problem; forward and backward under the sync guard.
    device="cpu" (with TRITON_INTERPRET=1, small shapes) is how CI checks this check."""
    import torch

    from macl_kernels import grouped_info_nce
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    M = N if q_is_k else M
    q0 = torch.randn(G, N, D, generator=gen, dtype=torch.float64)
    k0 = q0 if q_is_k else torch.randn(G, M, D, generator=gen, dtype=torch.float64)
    if nan_case:   # every logit ≈ −150 at τ = 0.1: q ≈ 3u, k ≈ −5u for one unit vector u
        u = torch.nn.functional.normalize(torch.randn(D, generator=gen, dtype=torch.float64), dim=0)
        q0 = 3 * u + 0.01 * q0 / D ** 0.5
        k0 = -5 * u + 0.01 * k0 / D ** 0.5
    elif not normalize:
        q0 = torch.nn.functional.normalize(q0, dim=-1)
        k0 = q0 if q_is_k else torch.nn.functional.normalize(k0, dim=-1)
    rule_kw = _rule_kwargs(rule, G, N, M, q_is_k, gen, dev)
    w = torch.randn(G, N, generator=gen, dtype=torch.float64).to(dev)
    tdt = torch.float32 if dtype == "tf32" else getattr(torch, dtype)

    def one(impl, run_dtype, guard=False):
        q = q0.to(dev, run_dtype).requires_grad_()
        k = q if q_is_k else k0.to(dev, run_dtype).requires_grad_(k_grad)
        tau = torch.tensor(0.1, device=dev, dtype=torch.float64 if run_dtype == torch.float64 else torch.float32,
                           requires_grad=True) if learn_tau else 0.1
        kw = dict(temperature=tau, impl=impl, reduction="none", normalize=normalize, exclude_self=q_is_k,
                  **rule_kw)
        if impl == "triton":
            kw["allow_tf32"] = dtype == "tf32"
        with sync_guard(device) if guard else contextlib.nullcontext():
            res = grouped_info_nce(q, None if q_is_k else k, **kw)
            (res.loss.double() * w).sum().backward()
        return [res.loss.detach(), res.lse, res.pos_count, q.grad, None if q_is_k else k.grad,
                tau.grad if learn_tau else None]

    with matmul_precision("high" if dtype == "tf32" else "highest"):
        one("triton", tdt)                              # warm-up: compile / autotune, unguarded
        ours = one("triton", tdt, guard=True)
        lowp = one("reference", tdt)
    truth = one("reference", torch.float64)
    if not torch.equal(ours[2].cpu(), truth[2].cpu()):
        raise AssertionError("positive counts differ from the reference")
    worst, worst_name = 0.0, ""
    for name, a, r, t in zip(("loss", "lse", "count", "dq", "dk", "dtau"), ours, lowp, truth):
        if name == "count" or t is None:
            continue
        if a is None:
            raise AssertionError(f"{name}: missing")
        if torch.isnan(a).any():
            raise AssertionError(f"{name}: NaN")
        fin = torch.isfinite(t)
        err = (a.double() - t).abs()[fin].max().item() if fin.any() else 0.0
        ref_err = (r.double() - t).abs()[fin].max().item() if fin.any() else 0.0
        scale = max(1.0, t.abs()[fin].max().item()) if fin.any() else 1.0
        bound = 2 * ref_err + ATOL[dtype] * scale
        ratio = err / bound
        if ratio > worst:
            worst, worst_name = ratio, name
        if err > bound:
            raise AssertionError(f"{name}: error {err:.3g} > bound {bound:.3g} (2·ref {ref_err:.3g} + atol)")
    guarded = "fwd+bwd sync-free" if device == "cuda" else "no sync guard on CPU"
    return dict(status="PASS", detail=f"worst err/bound {worst:.2f} ({worst_name}); {guarded}")


def run_autocast_test() -> dict:
    """A float32 model under torch.autocast("cuda", bfloat16): the kernels get bfloat16 operands."""
    import torch

    from macl_kernels import positional_sup_con
    from macl_kernels.triton import autograd as ag
    seen = []
    orig = ag.launch_fwd

    def spy(q, k, scale, o):
        seen.append(str(q.dtype).replace("torch.", ""))
        return orig(q, k, scale, o)

    model = torch.nn.Linear(64, 128).cuda()
    x, pos = torch.randn(512, 64, device="cuda"), torch.rand(256, device="cuda")
    ag.launch_fwd = spy
    try:
        for guard in (False, True):
            with sync_guard() if guard else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = positional_sup_con(model(x).reshape(256, 2, 128), pos, 0.1, impl="triton")
                loss.backward()
    finally:
        ag.launch_fwd = orig
    if seen != ["bfloat16", "bfloat16"] or model.weight.grad.dtype != torch.float32:
        raise AssertionError(f"kernels received {seen}, weight grad {model.weight.grad.dtype}")
    return dict(status="PASS", detail="autocast bf16 → bfloat16 operands, float32 grads; sync-free")


def run_macl_sync_test() -> dict:
    """A MACL forward + backward (impl="triton", autocast fp16) under the sync guard."""
    import torch
    method, batch, _ = _macl_setup("triton", dict(dims=2, batch=8, size=128, depth=4))
    for guard in (False, True):
        with sync_guard() if guard else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = method.combine(method(batch))
            loss.backward()
    return dict(status="PASS", detail="L_g + L_d + L_ER forward and backward without a host sync")


def test_cases() -> list:
    cases = []
    for i, (dt, rule) in enumerate((d, r) for d in TEST_DTYPES for r in RULES):
        cases.append(CheckCase("test", f"{rule} {dt} learnable-tau", "triton",
                               _bind(run_core_test, rule=rule, dtype=dt, seed=i), 4.0))
    extra = {
        "index bf16 keys-without-grad": dict(rule="index", dtype="bfloat16", k_grad=False, N=700, M=4000),
        "label fp16 float-tau": dict(rule="label", dtype="float16", learn_tau=False),
        "label fp32 q-is-k": dict(rule="label", dtype="float32", q_is_k=True, N=1200),
        # the self-contrast backward ('dsym', one kernel for dq + dk; a float τ: a learnable one takes dq + dk)
        # on large tiles, 16-bit and wide D
        "index bf16 q-is-k D=256 float-tau": dict(rule="index", dtype="bfloat16", q_is_k=True, N=2100, D=256,
                                                  learn_tau=False),
        "radius fp16 q-is-k D=512 float-tau": dict(rule="radius", dtype="float16", q_is_k=True, N=1500, D=512,
                                                   learn_tau=False),
        "radius fp16 G=256 N=M=32": dict(rule="radius", dtype="float16", G=256, N=32, M=32, q_is_k=True, D=64),
        "label bf16 in-core-normalize": dict(rule="label", dtype="bfloat16", normalize=True),
        "index fp32 in-core-normalize": dict(rule="index", dtype="float32", normalize=True),
        **{f"{r} fp32 NaN-case (logits≈−150)": dict(rule=r, dtype="float32", nan_case=True) for r in RULES},
        "index bf16 NaN-case (logits≈−150)": dict(rule="index", dtype="bfloat16", nan_case=True),
    }
    for j, (name, kw) in enumerate(extra.items()):
        kw = {**kw, "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(kw["dtype"], kw["dtype"])}
        cases.append(CheckCase("test", name, "triton", _bind(run_core_test, seed=100 + j, **kw), 4.0))
    cases.append(CheckCase("test", "autocast bf16 float32-model operand dtype", "triton", run_autocast_test, 3.0))
    cases.append(CheckCase("test", "MACL fwd+bwd sync-free (autocast fp16)", "triton", run_macl_sync_test, 8.0))
    return cases


def _bind(fn, **kw):
    def run():
        return fn(**kw)
    run.__name__ = fn.__name__
    return run


# ------------------------------------------------------------------------------------------------ speed

def naive_loss_fn():
    """Naive PyTorch at τ = 0.1: the N×M logits, then cross-entropy with positive i for anchor i (no imports
    inside the function, so that torch.compile traces it plainly)."""
    import torch
    import torch.nn.functional as F

    def naive_loss(q, k):
        return F.cross_entropy((q @ k.t()).float() * 10.0, torch.arange(q.shape[0], device=q.device))
    return naive_loss


_COMPILED: dict = {}


def _loss_fn(impl: str):
    if impl == "triton":
        from macl_kernels import grouped_info_nce
        return lambda q, k: grouped_info_nce(q, k, temperature=0.1, impl="triton").loss
    if impl == "naive":
        return naive_loss_fn()
    if "fn" not in _COMPILED:   # one compile for every shape (dynamic=True), timed in its first row
        import torch
        _COMPILED["fn"] = torch.compile(naive_loss_fn(), dynamic=True)
    return _COMPILED["fn"]


def naive_bytes(N: int, M: int) -> int:
    """Peak bytes naive PyTorch needs beyond its inputs: bf16 logits, their fp32 copy, log-softmax, and the
    gradient's fp32 and bf16 copies (≈ 16 bytes per logit, checked against the measured peaks at 16384)."""
    return 16 * N * M


#: GPU memory the plan assumes (an H100 has 80 GB; the run checks the free memory again)
PLAN_GPU_BYTES = 80e9
#: fraction of the (free) memory a naive case may need; above it the case is skipped, planned or at run time
NAIVE_FIT = 0.75


def naive_fits(N: int, M: int, free_bytes: float = PLAN_GPU_BYTES) -> bool:
    """True when naive PyTorch's N×M intermediates fit (65536² needs ~64 GiB: skipped on an 80 GB H100)."""
    return naive_bytes(N, M) <= NAIVE_FIT * free_bytes


#: first Triton call of a D (JIT compile of every autotune candidate of fwd, dq and dk, then autotuning) and
#: first call of a new N at a known D (autotuning only), seconds on an H100 host (compile: ~2 s a kernel)
TRITON_COMPILE_S = 20.0
TRITON_RETUNE_S = 3.0


def run_speed(N: int, D: int, phase: str, impl: str) -> dict:
    import torch
    M = N
    torch.cuda.empty_cache()    # the previous case's blocks: free memory is what this case can have
    if impl in ("naive", "compile"):
        free, _ = torch.cuda.mem_get_info()
        need = naive_bytes(N, M)
        if not naive_fits(N, M, free):
            return dict(status="SKIP(memory)", detail=f"N×M logits need ~{need / 2**30:.0f} GiB, "
                                                      f"{free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=gen), dim=-1)
    q = q.to(torch.bfloat16).requires_grad_()
    k = k.to(torch.bfloat16).requires_grad_()
    fn = _loss_fn(impl)
    t0 = time.perf_counter()
    if phase == SELF_PHASE:   # N anchors against themselves, positive i ↔ i + N/2 (nt_xent's pairing)
        from macl_kernels import grouped_info_nce
        pair = torch.arange(N, device="cuda").roll(N // 2).reshape(1, N)
        x = q.detach().reshape(1, N, D).requires_grad_()

        def step():
            x.grad = None
            grouped_info_nce(x, None, temperature=0.1, pos_index=pair, exclude_self=True, impl="triton").loss.backward()
    elif phase == "forward":
        def step():
            fn(q, k)
    else:
        def step():
            q.grad = k.grad = None
            fn(q, k).backward()
    try:
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        sec, host, peak = time_cuda(step)
    except torch.cuda.OutOfMemoryError as e:
        return dict(status="OOM", detail=str(e).splitlines()[0][:120])
    tflops = NOMINAL_FLOP[phase] * N * M * D / sec / 1e12
    detail = f"host enqueue {host * 1e3:.3f} ms/call; first call {first:.1f} s"
    row = dict(status="ok", ms=sec * 1e3, tflops=tflops, peak_gib=peak / 2**30, detail=detail)
    if impl == "triton":
        ceil = ceiling_tflops(N, M, D, phase)
        row.update(x_ceiling=tflops / ceil, detail=f"model {ceil:.0f} TFLOP/s; {detail}")
    return row


def speed_estimate(N: int, D: int, phase: str, impl: str, first_n: bool, first_d: bool) -> float:
    """Planned wall seconds of one speed case: inputs, the warm-up call, a ~0.3 s timing window (at least 3
    calls at ~100 TFLOP/s), plus compile / autotune where this row pays it (Triton: every candidate at the
    first N of each D (forward and fwd+bwd compile different kernels), re-tuning at each new N; torch.compile:
    one dynamic-shape compile in its first row); 0.1 s for a naive row planned as skipped (memory)."""
    if impl in ("naive", "compile") and not naive_fits(N, N):
        return 0.1
    call_s = NOMINAL_FLOP[phase] * N * N * D / 100e12
    est = 1.0 + call_s + max(0.3, 3 * call_s)
    if impl == "triton":
        est += TRITON_COMPILE_S if first_n else TRITON_RETUNE_S
    if impl == "compile" and first_n and first_d and phase == PHASES[0]:
        est += 40.0
    return est


def speed_cases() -> list:
    cases = []
    for ni, N in enumerate(SPEED_N):
        for di, D in enumerate(SPEED_D):
            for phase in PHASES:
                for impl in ("triton", "naive", "compile"):
                    est = speed_estimate(N, D, phase, impl, ni == 0, di == 0)
                    cases.append(CheckCase("speed", f"{phase} N=M={N} D={D} bf16", impl,
                                           _bind(run_speed, N=N, D=D, phase=phase, impl=impl), est,
                                           priority=10 + (0 if ni == 0 else 20 * ni),
                                           meta=dict(N=N, D=D, phase=phase)))
            if N == SPEED_N[0]:   # self-contrast at the target shape: fwd + dsym
                # its forward is compiled and tuned by the rows above; only the dsym kernel is new (~ a re-tune)
                est = speed_estimate(N, D, SELF_PHASE, "triton", False, di == 0)
                cases.append(CheckCase("speed", f"{SELF_PHASE} N={N} D={D} bf16", "triton",
                                       _bind(run_speed, N=N, D=D, phase=SELF_PHASE, impl="triton"), est,
                                       priority=11, meta=dict(N=N, D=D, phase=SELF_PHASE)))
    return cases


# ------------------------------------------------------------------------------------------- MACL step

def _macl_setup(impl: str, c: dict):
    import torch

    from macl.settings.config import MethodConfig, NetConfig
    from macl.methods import Batch, build_method
    torch.manual_seed(0)
    method = build_method(NetConfig(dims=c["dims"], depth=c["depth"]), MethodConfig(name="macl", impl=impl)).cuda()
    shape = (c["batch"], 1) + (c["size"],) * c["dims"]
    batch = Batch(positions=torch.rand(c["batch"]), img1=torch.rand(shape), img2=torch.rand(shape),
                  img3=torch.rand(shape), img4=torch.rand(shape)).to("cuda")
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    return method, batch, opt


def run_macl_step(case: str, impl: str) -> dict:
    """One pre-training step as macl.train does it: autocast fp16 forward, GradScaler backward, SGD step."""
    import torch

    from benchmarks.bench_macl_step import CASES
    method, batch, opt = _macl_setup(impl, CASES[case])
    scaler = torch.amp.GradScaler("cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = method.combine(method(batch))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    sec, host, peak = time_cuda(step, target_s=1.0, max_iters=10)
    c = CASES[case]
    return dict(status="ok", ms=sec * 1e3, peak_gib=peak / 2**30,
                detail=f"batch {c['batch']} at {c['size']}^{c['dims']}, depth {c['depth']}, autocast fp16; "
                       f"host enqueue {host * 1e3:.1f} ms/step")


def macl_cases() -> list:
    return [CheckCase("macl-step", f"MACL step {case}", impl, _bind(run_macl_step, case=case, impl=impl),
                      12.0 if case == "2d" else 20.0, priority=20, meta=dict(case=case))
            for case in ("2d", "3d") for impl in ("triton", "torch")]


def all_cases() -> list:
    """Every case, in table order (the runner orders by priority)."""
    return test_cases() + speed_cases() + macl_cases()
