"""L2 normalisation inside the core: per-row inverse norms and the in-place backward projection.

x̂_i = x_i / max(‖x_i‖, ε) with ε = 1e-12, exactly `torch.nn.functional.normalize(x, dim=-1)`. The torch
paths never build x̂ as an (N, D) tensor they keep: they scale rows of tiles by `inv_norms(x)` and, in the
backward, turn the gradient with respect to x̂ into the one with respect to x in place (`project_`).
"""
from __future__ import annotations

import torch

EPS = 1e-12  # F.normalize's default eps


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(‖x_i‖, ε) along the last dim: (..., D) -> (...), in x's dtype."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_(min=EPS).reciprocal_()


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a_i, b_i⟩ along the last dim: (..., D) × (..., D) -> (...). No (..., D) temporary (linalg.vecdot
    makes one)."""
    if a.numel() <= 1 << 16:   # small: linalg.vecdot's launch is several times cheaper than einsum's
        return torch.linalg.vecdot(a, b)
    return torch.einsum("...d,...d->...", a, b)


def project_(dx_hat: torch.Tensor, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """In place: dx̂ (..., D), the gradient w.r.t. x̂ = x·inv, becomes the gradient w.r.t. x.

    dx = inv·(dx̂ − x̂⟨x̂, dx̂⟩) = inv·dx̂ − inv³⟨x, dx̂⟩·x where ‖x‖ > ε; inv·dx̂ where the norm was clamped
    (as autograd through F.normalize gives). No (..., D) temporary. Returns dx_hat.
    """
    r = rowdot(x, dx_hat) * inv.pow(3)
    # clamped rows have inv = 1/ε up to rounding; no unclamped norm lies within 1e-6 of ε in practice
    r = r.masked_fill_(inv >= (1.0 - 1e-6) / EPS, 0.0)[..., None]
    return dx_hat.mul_(inv[..., None]).addcmul_(x, r, value=-1.0)


def project_hat_(dx_hat: torch.Tensor, x_hat: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """`project_` given x̂ = x·inv itself (fewer operations when x̂ is kept anyway): inv·(dx̂ − x̂⟨x̂, dx̂⟩)."""
    r = rowdot(x_hat, dx_hat).masked_fill_(inv >= (1.0 - 1e-6) / EPS, 0.0)
    return dx_hat.addcmul_(x_hat, r[..., None], value=-1.0).mul_(inv[..., None])
