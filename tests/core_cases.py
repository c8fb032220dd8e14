"""Shared by the core-operation tests: random problems, running an implementation, the tolerance rule.

Tolerance rule (KERNELS.md §5): an implementation run in dtype X passes when, for the loss and every
gradient, its max error against the float64 reference is at most 2× the error of the reference run in
that same dtype X, plus atol(X).
"""
from __future__ import annotations

from typing import Optional

import torch

from macl_kernels import grouped_info_nce

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_case(rule: str, G: int, N: int, M: int, D: int, *, self_contrast=False, masks=False,
              unnormalised=False, seed=0) -> dict:
    """Random inputs (float64) and rule metadata for one core call. Positions are multiples of 0.05, so
    ties at the threshold (0.1) occur and are tested."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(G, N, D, generator=gen, dtype=torch.float64)
    q = q * 3 if unnormalised else torch.nn.functional.normalize(q, dim=-1)
    k = None
    if not self_contrast:
        k = torch.randn(G, M, D, generator=gen, dtype=torch.float64)
        k = k * 3 if unnormalised else torch.nn.functional.normalize(k, dim=-1)
    else:
        M = N
    kw: dict = {}
    if rule == "index":
        kw["pos_index"] = torch.randint(0, M, (G, N), generator=gen)
    elif rule == "label":
        kw["q_labels"] = torch.randint(0, 5, (G, N), generator=gen)
        if not self_contrast:
            kw["k_labels"] = torch.randint(0, 5, (G, M), generator=gen)
    elif rule == "radius":
        kw["q_positions"] = torch.randint(0, 21, (G, N), generator=gen) * 0.05
        if not self_contrast:
            kw["k_positions"] = torch.randint(0, 21, (G, M), generator=gen) * 0.05
        kw["threshold"] = 0.1
    if self_contrast:
        kw["exclude_self"] = True
    if masks:
        kw["q_valid"] = torch.rand(G, N, generator=gen) > 0.25
        kw["k_valid"] = torch.rand(G, M, generator=gen) > 0.25
    return dict(q=q, k=k, kw=kw)


def run(impl: str, case: dict, dtype: torch.dtype, tau: float = 0.1, *, k_grad: bool = True,
        learn_tau: bool = True, device: str = "cpu", normalize: bool = False) -> dict:
    """Run the core with per-anchor outputs, backprop a fixed random weighting, return values and grads
    (normalize=True: the core L2-normalises q and k itself; gradients are w.r.t. the raw inputs)."""
    q = case["q"].detach().to(device=device, dtype=dtype).clone().requires_grad_()
    k = None
    if case["k"] is not None:
        k = case["k"].detach().to(device=device, dtype=dtype).clone().requires_grad_(k_grad)
    tau_t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=device, requires_grad=True) if learn_tau else tau
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in case["kw"].items()}
    res = grouped_info_nce(q, k, temperature=tau_t, reduction="none", impl=impl, normalize=normalize, **kw)
    w = torch.randn(res.per_anchor.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(device=device, dtype=res.per_anchor.dtype)
    (res.per_anchor * w).sum().backward()
    out = dict(loss=res.per_anchor.detach(), lse=res.lse, count=res.pos_count, dq=q.grad)
    if k is not None and k_grad:
        out["dk"] = k.grad
    if learn_tau:
        out["dtau"] = tau_t.grad
    return out


def max_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    both_inf = torch.isinf(a64) & torch.isinf(b64) & (torch.sign(a64) == torch.sign(b64))
    d = (a64 - b64).abs().masked_fill(both_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def assert_matches_truth(got: dict, truth: dict, low_ref: Optional[dict], dtype: torch.dtype,
                         what: str = "") -> None:
    """Check every output against the float64 truth with the 2×-reference-error rule."""
    assert torch.equal(got["count"].cpu(), truth["count"]), f"{what}: positive counts differ"
    for name in truth:
        if name == "count":
            continue
        assert name in got, f"{what}: missing {name}"
        assert torch.isfinite(got[name].double()).all() or name == "lse", f"{what}: non-finite {name}"
        err = max_err(got[name], truth[name])
        ref_err = max_err(low_ref[name], truth[name]) if low_ref is not None else 0.0
        bound = 2 * ref_err + ATOL[dtype] * max(1.0, float(truth[name].abs().max()) if name != "lse" else 1.0)
        assert err <= bound, f"{what}: {name} error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {ref_err:.3g})"
