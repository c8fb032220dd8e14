"""Geometry checks before pre-training: refuse patch sizes / depths at which a MACL loss term is degenerate.

With patch S (per axis), depth d, k decoder blocks and dominant scale s = 2^−k (MACL.md):
    auxiliary bottleneck (= L_d's grid)   S / 2^d
    dominant bottleneck (L_ER's target)   S·s / 2^d = S / 2^(d+k)
- L_ER (λ_ER > 0) is degenerate when the dominant bottleneck is below 2 on an axis: resizing the auxiliary map
  to 1 with align_corners=True samples its first (corner, usually background) row, so L_ER only drives the
  dominant bottleneck to zero.
- L_d (λ_d > 0) is degenerate when its grid is below 2 on an axis (one location: a single global vector).
- S must be divisible by 2^(d+k) (the dominant input must fit the encoder).
The smallest patch that satisfies all three at depth d is 2^(d+k+1) per axis (2^(d+k) when λ_ER = 0 and
2^(d+k) ≥ 2^(d+1)); the error names it, and the largest depth that works at the given patch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .config import MethodConfig, NetConfig


class GeometryError(ValueError):
    """A patch size / depth at which a loss term is degenerate (the message names a size that works)."""


def macl_sizes(patch: Sequence[int], depth: int, decoder_blocks: int) -> dict:
    """{"grid": L_d grid per axis, "dominant": dominant bottleneck per axis} (floats: exact quotients)."""
    return {"grid": [p / 2 ** depth for p in patch], "dominant": [p / 2 ** (depth + decoder_blocks) for p in patch]}


def min_patch(depth: int, decoder_blocks: int, need_er: bool = True, need_d: bool = True) -> int:
    """The smallest patch side (per axis) at which MACL's enabled terms are non-degenerate at this depth."""
    unit = 2 ** (depth + decoder_blocks)
    need = unit
    if need_er:
        need = max(need, 2 * unit)
    if need_d:
        need = max(need, 2 ** (depth + 1))
    return -(-need // unit) * unit


def max_depth(patch: Sequence[int], decoder_blocks: int, need_er: bool = True, need_d: bool = True) -> Optional[int]:
    """The largest depth ≥ decoder_blocks at which every axis of `patch` works, or None."""
    best = None
    for d in range(decoder_blocks, 12):
        if all(p % 2 ** (d + decoder_blocks) == 0 and p >= min_patch(d, decoder_blocks, need_er, need_d) for p in patch):
            best = d
    return best


def geometry_problems(net: NetConfig, method: MethodConfig, patch: Sequence[int]) -> List[str]:
    """What is degenerate about MACL at this patch (empty for other methods, or when nothing is)."""
    if method.name != "macl":
        return []
    k, d = int(method.decoder_blocks), int(net.depth)
    patch = [int(p) for p in patch]
    sizes = macl_sizes(patch, d, k)
    shown = "x".join(str(p) for p in patch)
    out = []
    if any(p % 2 ** (d + k) for p in patch):
        out.append(f"patch {shown} is not divisible by 2^(depth+decoder_blocks) = {2 ** (d + k)}")
    if method.lambda_er > 0 and min(sizes["dominant"]) < 2:
        dom = "x".join(f"{v:g}" for v in sizes["dominant"])
        out.append(f"the dominant bottleneck is {dom} (patch x {method.dominant_scale:g} / 2^{d}), below 2 per axis, so "
                   f"L_ER is degenerate")
    if method.lambda_d > 0 and min(sizes["grid"]) < 2:
        grid = "x".join(f"{v:g}" for v in sizes["grid"])
        out.append(f"the L_d grid is {grid} (patch / 2^{d}), below 2 per axis, so L_d is degenerate")
    return out


def tapped_problems(net_name: str, patch: Sequence[int], bottleneck: Sequence[int], ratio: Sequence[int],
                    method: MethodConfig, bottleneck_module: str) -> List[str]:
    """What is degenerate about MACL on a tapped network (`macl.nets.adapters`), from the tapped shapes.

    patch: the input crop S; bottleneck: the bottleneck's spatial size at S; ratio r: how many times finer the
    decoder tap is than the bottleneck (per axis), so the dominant input is S/r and its bottleneck bottleneck/r.
    Returns one-line problems naming the module and sizes (empty when none).
    """
    shown = "x".join(str(int(p)) for p in patch)
    stride = [int(p) // int(b) for p, b in zip(patch, bottleneck)]
    out = []
    bad = [i for i, (p, r, s) in enumerate(zip(patch, ratio, stride)) if p % (r * s)]
    if bad:
        need = "x".join(str(r * s) for r, s in zip(ratio, stride))
        out.append(f"patch {shown} is not divisible by {need} (the dominant input patch/{list(ratio)} must fit "
                   f"{net_name}'s bottleneck stride {stride})")
        return out
    dom = [int(b) // int(r) for b, r in zip(bottleneck, ratio)]
    if method.lambda_er > 0 and min(dom) < 2:
        out.append(f"the dominant bottleneck (module {bottleneck_module!r}) is {'x'.join(map(str, dom))} "
                   f"(patch / {'x'.join(map(str, ratio))} / stride {'x'.join(map(str, stride))}), below 2 per axis, "
                   f"so L_ER is degenerate")
    if method.lambda_d > 0 and min(bottleneck) < 2:
        out.append(f"the L_d grid (module {bottleneck_module!r}) is {'x'.join(map(str, bottleneck))}, below 2 per "
                   f"axis, so L_d is degenerate")
    return out


def require_tapped_geometry(net_name: str, patch: Sequence[int], bottleneck: Sequence[int], ratio: Sequence[int],
                            method: MethodConfig, bottleneck_module: str) -> None:
    """Raise `GeometryError` (one line, naming the module, the sizes and the smallest patch that works) when
    `tapped_problems` finds anything."""
    problems = tapped_problems(net_name, patch, bottleneck, ratio, method, bottleneck_module)
    if not problems:
        return
    stride = [int(p) // max(1, int(b)) for p, b in zip(patch, bottleneck)]
    unit = [r * s for r, s in zip(ratio, stride)]
    lo = [max(u * (2 if method.lambda_er > 0 else 1), 2 * s) for u, s in zip(unit, stride)]
    fixed = [max(l_, -(-int(p) // u) * u) for l_, p, u in zip(lo, patch, unit)]
    fixed = [-(-f // u) * u for f, u in zip(fixed, unit)]
    raise GeometryError(f"MACL on {net_name} at patch {'x'.join(str(int(p)) for p in patch)}: {'; '.join(problems)}. "
                        f"Use a patch of {'x'.join(map(str, fixed))} or larger (--patch-size).")


def require_valid_geometry(net: NetConfig, method: MethodConfig, patch: Sequence[int]) -> None:
    """Raise `GeometryError` (one line, naming a patch size and a depth that work) when `geometry_problems`
    finds anything; return None otherwise. A MONAI network (net.arch "monai:...") is checked from its tapped
    shapes by `macl.nets.adapters` instead (at the first forward pass, before any step)."""
    if getattr(net, "arch", "unet") != "unet":
        return
    problems = geometry_problems(net, method, patch)
    if not problems:
        return
    k, d = int(method.decoder_blocks), int(net.depth)
    need_er, need_d = method.lambda_er > 0, method.lambda_d > 0
    unit, lo = 2 ** (d + k), min_patch(d, k, need_er, need_d)
    fixed = [max(lo, -(-int(p) // unit) * unit) for p in patch]
    fixes = [f"a patch of {'x'.join(map(str, fixed))} at depth {d}"]
    depth = max_depth(patch, k, need_er, need_d)
    if depth is not None:
        fixes.append(f"depth {depth} at patch {'x'.join(str(int(p)) for p in patch)}")
    raise GeometryError(f"MACL at patch {'x'.join(str(int(p)) for p in patch)}, depth {d}: {'; '.join(problems)}. "
                        f"Use {' or '.join(fixes)} (--patch-size / --depth).")


__all__ = ["GeometryError", "geometry_problems", "require_valid_geometry", "tapped_problems", "require_tapped_geometry", "min_patch", "max_depth", "macl_sizes"]
