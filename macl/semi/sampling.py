"""Variance-reduced sampling of contrast anchors and negatives (ARCO, You et al., NeurIPS 2023).

Every sampler picks `n` indices into a candidate set of N points (pixels/voxels of one class, or entries of
a memory bank) that carry unit coordinates `coords` (N, d) in [0, 1]^d (d = 2 or 3; a voxel i of an axis
of length S sits at (i + 0.5)/S, see `unit_coords`).

- "ns"  naive: a uniform subset (without replacement; with `replacement=True` i.i.d. uniform draws, as
        the public code's torch.randint).
- "sg"  stratified group: the strata are the cells of a regular grid over [0, 1]^d (`grid` cells per axis),
        optionally split further by a label per point (class) and/or an image index. Stratum m with N_m
        candidates receives n_m draws, proportional allocation n·N_m/N rounded at random (systematic
        rounding: n_m ∈ {⌊n·N_m/N⌋, ⌈n·N_m/N⌉}, Σ n_m = n, E[n_m] = n·N_m/N exactly), drawn uniformly
        without replacement inside the stratum. The plain mean of h over the sample is therefore an
        exactly unbiased estimate of the mean of h over the candidates, with variance at most NS's.
- "sag" stratified antithetic: ⌈n/2⌉ base points drawn as "sg", and for the first ⌊n/2⌋ of them their
        reflection about the centre of their grid cell: x' = 2·c_m − x. The reflection is the candidate of
        the same stratum nearest to x' (x' itself when it is a candidate, e.g. every voxel of a cell that
        holds only candidates), so it always lies in the same stratum.
- "index_sg", "index_sag": the public code's variant (`grid_monte_carlo_sample` / `grid_as_monte_carlo_sample`):
        the candidate indices 0..N−1, in the order they were gathered, are laid out as a ⌊√N⌉×⌊√N⌉ pseudo-grid
        cut into cut×cut blocks (the last row/column of blocks takes the remainder); each block gets
        ⌊n·edge²/N⌋//cut² draws with replacement ("index_sag": half of them plus their reflections
        center − x, center = first + last index of the block); indices ≥ N are dropped, the list is
        shuffled, padded with uniform draws and cut to n. Spatial coordinates are not used.

When n exceeds the candidates (of a stratum), each candidate is taken ⌊n_m/N_m⌋ times and the rest without
replacement, which keeps every candidate's expected multiplicity at n_m/N_m.

Layout of the returned indices: "sg" and "ns" in random order within each stratum, strata in increasing id;
"sag" = [bases (⌈n/2⌉) | reflections of bases 0..⌊n/2⌋−1]. Callers that reshape a draw into per-anchor
groups should permute it first (`macl.semi.losses` does).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

SAMPLERS = ("ns", "sg", "sag", "index_sg", "index_sag")
Grid = Union[int, Sequence[int]]


class Draw(NamedTuple):
    """index (n,) int64 into the candidates; stratum (n,) int64 stratum of each drawn point (−1 for "ns"
    and the index-grid samplers' padding)."""

    index: torch.Tensor
    stratum: torch.Tensor


# ------------------------------------------------------------------------------------------ geometry
def unit_coords(flat_index: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Unit coordinates (i + 0.5)/S per axis of flat (row-major) indices into `spatial_shape`.

    flat_index (N,) int; spatial_shape (d,). Returns (N, d) float64 in (0, 1).
    Raises ValueError for an empty shape or an index out of range.
    """
    shape = [int(s) for s in spatial_shape]
    if not shape or min(shape) < 1:
        raise ValueError(f"spatial_shape must be positive sizes, got {tuple(spatial_shape)}")
    total = math.prod(shape)
    if flat_index.numel() and (int(flat_index.min()) < 0 or int(flat_index.max()) >= total):
        raise ValueError(f"flat indices must lie in [0, {total}) for shape {tuple(shape)}, got "
                         f"[{int(flat_index.min())}, {int(flat_index.max())}]")
    out = []
    rest = flat_index.long()
    for s in reversed(shape):
        out.append((rest % s).double().add_(0.5).div_(s))
        rest = rest // s
    return torch.stack(out[::-1], dim=1)


def _grid_sizes(grid: Grid, d: int) -> Tuple[int, ...]:
    sizes = (int(grid),) * d if isinstance(grid, int) else tuple(int(g) for g in grid)
    if len(sizes) != d or min(sizes) < 1:
        raise ValueError(f"grid must be one positive int or {d} positive ints for {d}-D coordinates, got {grid!r}")
    return sizes


def grid_cells(coords: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Grid cell of each point: coords (N, d) in [0, 1]; `grid` cells per axis (int or d ints).

    Returns (N,) int64 row-major cell ids in [0, Π grid). Coordinates are clamped into [0, 1].
    """
    if coords.dim() != 2:
        raise ValueError(f"coords must be (N, d), got shape {tuple(coords.shape)}")
    g = _grid_sizes(grid, coords.shape[1])
    cell = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device)
    for a, ga in enumerate(g):
        ia = (coords[:, a].clamp(0, 1) * ga).floor().long().clamp_(0, ga - 1)
        cell = cell * ga + ia
    return cell


def cell_centres(cells: torch.Tensor, grid: Grid, d: int) -> torch.Tensor:
    """Unit-coordinate centres (N, d) float64 of row-major grid cell ids (N,)."""
    g = _grid_sizes(grid, d)
    out = []
    rest = cells.long()
    for ga in reversed(g):
        out.append(((rest % ga).double() + 0.5) / ga)
        rest = rest // ga
    return torch.stack(out[::-1], dim=1)


def stratum_ids(coords: torch.Tensor, grid: Grid, labels: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """Strata = grid cells, split further by `labels` (N,) and/or `image` (N,) ints ≥ 0 when given.

    Returns (strata (N,) int64 in [0, n_strata), n_strata); the cell of stratum s is s % Π grid.
    """
    cells = grid_cells(coords, grid)
    n = math.prod(_grid_sizes(grid, coords.shape[1]))
    strata = cells
    for name, extra in (("labels", labels), ("image", image)):
        if extra is None:
            continue
        if extra.shape != cells.shape:
            raise ValueError(f"{name} must have shape {tuple(cells.shape)}, got {tuple(extra.shape)}")
        if extra.numel() and int(extra.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got minimum {int(extra.min())}")
        width = int(extra.max()) + 1 if extra.numel() else 1
        strata = extra.long() * n + strata
        n *= width
    return strata, n


# ------------------------------------------------------------------------------------------ allocation
def allocate(counts: torch.Tensor, n: int, generator: Optional[torch.Generator] = None,
             rounding: str = "random") -> torch.Tensor:
    """Proportional allocation of n draws over strata with `counts` (M,) candidates.

    rounding="random": systematic randomised rounding of n·N_m/N (each n_m is the floor or the ceiling,
    E[n_m] = n·N_m/N, Σ n_m = n). "largest": largest remainders (deterministic, ties to the lower id).
    Returns (M,) int64; all zeros when there are no candidates.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if rounding not in ("random", "largest"):
        raise ValueError(f"rounding must be 'random' or 'largest', got {rounding!r}")
    counts = counts.long()
    total = int(counts.sum())
    if total == 0 or n == 0:
        return torch.zeros_like(counts)
    exact = counts.double() * (n / total)
    base = exact.floor()
    frac = exact - base
    missing = n - int(base.sum().round())
    if missing > 0:
        if rounding == "largest":
            extra = torch.zeros_like(frac)
            extra[torch.argsort(frac, descending=True, stable=True)[:missing]] = 1
        else:  # systematic: extra_m = ⌊C_m + u⌋ − ⌊C_{m−1} + u⌋ with C the cumulative fractions
            u = _rand(1, generator, frac.device)[0]
            cum = torch.cumsum(frac, 0)
            # Σ frac = missing exactly in exact arithmetic; pin the float sum so the draw totals n.
            cum = cum * (missing / float(cum[-1]))
            hi = torch.floor(cum + u)
            lo = torch.cat([torch.floor(u)[None], hi[:-1]])
            extra = (hi - lo).clamp_(0, 1)
            short = missing - int(extra.sum())
            if short:  # float edge case: fix up deterministically by largest fraction
                order = torch.argsort(frac - 2 * extra, descending=True) if short > 0 else \
                    torch.argsort(frac + 2 * (1 - extra))
                extra[order[:abs(short)]] += 1 if short > 0 else -1
        base = base + extra
    return base.long()


def _rand(n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    if generator is not None and generator.device != torch.device(device):
        return torch.rand(n, generator=generator, dtype=torch.float64).to(device)
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def draw_per_stratum(strata: torch.Tensor, alloc: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> Draw:
    """alloc[m] uniform draws from the candidates of stratum m (strata (N,) in [0, M), alloc (M,)).

    Without replacement inside a stratum; where alloc[m] > N_m every candidate is taken ⌊alloc/N_m⌋ times
    plus a uniform subset of the rest. Returns a `Draw` grouped by stratum (increasing id).
    """
    N = strata.numel()
    if N == 0:
        empty = torch.zeros(0, dtype=torch.long, device=strata.device)
        return Draw(empty, empty)
    M = alloc.numel()
    counts = torch.bincount(strata, minlength=M)
    if bool((alloc[counts == 0] > 0).any()):
        raise ValueError("allocation gives draws to a stratum without candidates")
    # Sort by (stratum, uniform key): a uniform random order inside each stratum.
    order = torch.argsort(strata.double() + _rand(N, generator, strata.device))
    s_sorted = strata[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(N, device=strata.device) - starts[s_sorted]
    full = torch.where(counts > 0, alloc // counts.clamp(min=1), 0)
    rem = torch.where(counts > 0, alloc % counts.clamp(min=1), 0)
    picked = order[rank < rem[s_sorted]]
    parts = [picked]
    if bool((full > 0).any()):
        parts.append(torch.repeat_interleave(order, full[s_sorted]))
    index = torch.cat(parts)
    index = index[torch.argsort(strata[index], stable=True)]
    return Draw(index, strata[index])


# ------------------------------------------------------------------------------------------ samplers
def sample_naive(num_candidates: int, n: int, generator: Optional[torch.Generator] = None,
                 device: Union[str, torch.device] = "cpu", replacement: bool = False) -> Draw:
    """NS: n uniform indices into range(num_candidates) (without replacement unless `replacement`;
    n > num_candidates without replacement takes every candidate ⌊n/N⌋ times plus a uniform subset)."""
    if num_candidates < 0 or n < 0:
        raise ValueError(f"num_candidates and n must be >= 0, got {num_candidates} and {n}")
    if num_candidates == 0 or n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Draw(empty, empty)
    if replacement:
        u = _rand(n, generator, device)
        index = (u * num_candidates).long().clamp_(max=num_candidates - 1)
    else:
        zeros = torch.zeros(num_candidates, dtype=torch.long, device=device)
        index = draw_per_stratum(zeros, torch.tensor([n], device=device), generator).index
    return Draw(index, torch.full_like(index, -1))


def sample_stratified(coords: torch.Tensor, n: int, grid: Grid = 4, generator: Optional[torch.Generator] = None,
                      labels: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None,
                      rounding: str = "random") -> Draw:
    """SG: proportional stratified draw of n points (see the module docstring). coords (N, d) in [0, 1]."""
    strata, M = stratum_ids(coords, grid, labels, image)
    alloc = allocate(torch.bincount(strata, minlength=M), n, generator, rounding)
    return draw_per_stratum(strata, alloc, generator)


def sample_antithetic(coords: torch.Tensor, n: int, grid: Grid = 4, generator: Optional[torch.Generator] = None,
                      labels: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None,
                      rounding: str = "random") -> Draw:
    """SAG: ⌈n/2⌉ SG base points, then the reflections of the first ⌊n/2⌋ about their cell centres, each
    snapped to the nearest candidate of the same stratum (the exact mirror point when it is a candidate)."""
    half = (n + 1) // 2
    base = sample_stratified(coords, half, grid, generator, labels, image, rounding)
    if base.index.numel() == 0:
        return base
    # Shuffle the bases so that the one left without a reflection (odd n) is a random one.
    perm = torch.argsort(_rand(base.index.numel(), generator, coords.device))
    b_idx, b_str = base.index[perm], base.stratum[perm]
    n_ref = min(n // 2, b_idx.numel())
    src, src_str = b_idx[:n_ref], b_str[:n_ref]
    strata, _ = stratum_ids(coords, grid, labels, image)
    n_cells = math.prod(_grid_sizes(grid, coords.shape[1]))
    pts = coords.double()
    centre = cell_centres(src_str % n_cells, grid, coords.shape[1])
    target = 2 * centre - pts[src]
    refl = torch.empty_like(src)
    for m in torch.unique(src_str).tolist():
        rows = (src_str == m).nonzero().squeeze(1)
        cand = (strata == m).nonzero().squeeze(1)
        dist = torch.cdist(target[rows], pts[cand])  # (r_m, N_m): reflections of one stratum only
        refl[rows] = cand[dist.argmin(dim=1)]
    index = torch.cat([b_idx, refl])
    return Draw(index, torch.cat([b_str, src_str]))


def sample_index_grid(num_candidates: int, n: int, generator: Optional[torch.Generator] = None,
                      cut: int = 4, antithetic: bool = False, device: Union[str, torch.device] = "cpu") -> Draw:
    """The public code's pseudo-grid sampler over indices 0..N−1 (see the module docstring).

    Falls back to uniform draws with replacement when the pseudo-grid has fewer than `cut` rows, or when
    per-block counts round to zero (as the public code does through its exception path).
    """
    N = int(num_candidates)
    if N < 0 or n < 0 or cut < 1:
        raise ValueError(f"need num_candidates >= 0, n >= 0, cut >= 1, got {num_candidates}, {n}, {cut}")
    if N == 0 or n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Draw(empty, empty)
    edge = round(math.sqrt(N))
    per_block = n * edge * edge // N // (cut * cut)
    per_draw = per_block // 2 if antithetic else per_block
    if edge // cut < 1 or per_draw < 1:
        return sample_naive(N, n, generator, device, replacement=True)
    patch = edge // cut
    grid = torch.arange(edge * edge, device=device).reshape(edge, edge)
    picks, strata = [], []
    bounds = [(i * patch, (i + 1) * patch if i < cut - 1 else edge) for i in range(cut)]
    for bi, (r0, r1) in enumerate(bounds):
        for bj, (c0, c1) in enumerate(bounds):
            block = grid[r0:r1, c0:c1].reshape(-1)
            u = _rand(per_draw, generator, device)
            chosen = block[(u * block.numel()).long().clamp_(max=block.numel() - 1)]
            picks.append(chosen)
            if antithetic:
                picks.append(block[0] + block[-1] - chosen)
            strata.append(torch.full((chosen.numel() * (2 if antithetic else 1),), bi * cut + bj,
                                     dtype=torch.long, device=device))
    index, stratum = torch.cat(picks), torch.cat(strata)
    keep = index < N
    index, stratum = index[keep], stratum[keep]
    perm = torch.argsort(_rand(index.numel(), generator, device))
    index, stratum = index[perm], stratum[perm]
    if index.numel() < n:
        pad = sample_naive(N, n - index.numel(), generator, device, replacement=True)
        index, stratum = torch.cat([index, pad.index]), torch.cat([stratum, pad.stratum])
    return Draw(index[:n], stratum[:n])


def sample(kind: str, coords: torch.Tensor, n: int, grid: Grid = 4, generator: Optional[torch.Generator] = None,
           labels: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None, cut: int = 4,
           replacement: bool = False) -> Draw:
    """Dispatch: kind ∈ SAMPLERS; coords (N, d) unit coordinates of the candidates (only their count is
    used by "ns" and the index-grid samplers). Returns a `Draw` of n indices (fewer only when N = 0).

    Raises ValueError for an unknown kind (the known ones listed).
    """
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    N = coords.shape[0]
    if kind == "ns":
        return sample_naive(N, n, generator, coords.device, replacement)
    if kind == "sg":
        return sample_stratified(coords, n, grid, generator, labels, image)
    if kind == "sag":
        return sample_antithetic(coords, n, grid, generator, labels, image)
    return sample_index_grid(N, n, generator, cut, antithetic=kind == "index_sag", device=coords.device)
