"""Sampled pixel anchors and keys for the GCL-style pixel branch.

The pixel loss of one meta-label contrasts pixel features of two voxel-aligned views of B images; the
positives of pixel (v, b, s) (view v, image b, location s) are the pixels (v', b', s) at the SAME location of
every image b' in the same meta-label bin ("group"), its own other view included. Contrasting all 2·B·L
pixels against all of them costs (2BL)² pairs per label (docs/gcl.md); this module picks a subset that keeps
the positive structure intact:

- per group g (all images of one meta-label bin) one set of key locations K_g (|K_g| = n_keys) and, inside
  it, one set of anchor locations A_g ⊆ K_g (|A_g| = n_anchors), drawn with a `macl.semi.sampling` sampler on the
  unit coordinates of the pixel grid ("sg" stratified over a grid of cells: spatially spread; "sag" its
  antithetic variant; "ns" uniform);
- every image b of group g uses A_g and K_g, in BOTH views.

So an anchor (v, b, s) always meets (1 − v, b, s) among the keys (s ∈ A_g ⊆ K_g), and every positive
(v', b', s) of the full problem with b' in the same group is sampled whenever the anchor is: each sampled
anchor keeps *all* of its positives that the other sampled images carry, and at least one. Negatives are
the other key rows of the batch (other locations of the group, every location of the other groups).

Row layout (what `pixel_rows` returns): q = the anchor rows, view-major, then image, then the anchor
locations of the image's group; k = [q | the remaining key rows in the same order], so q is a prefix of k and
`exclude_self` (j == i) removes each anchor's own row. Labels: code(group)·L + s.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from ..semi.sampling import sample, unit_coords

ALL = "all"
PIXEL_SAMPLERS = ("ns", "sg", "sag")
Count = Union[int, str]


def check_count(name: str, value: Count) -> None:
    """Raise ValueError unless value is "all" or an int >= 1 (bools refused), naming the setting."""
    ok = value == ALL if isinstance(value, str) else (isinstance(value, int) and not isinstance(value, bool)
                                                      and value >= 1)
    if not ok:
        raise ValueError(f"method.{name} must be 'all' or an int >= 1, got {value!r}")


class PixelRows(NamedTuple):
    """q (Nq, C) anchor rows; k (Nk, C) key rows with q == k[:Nq]; q_labels (Nq,), k_labels (Nk,) int64;
    anchor_loc / key_loc: (B, n) int64 locations of each image (anchors first inside key_loc)."""
    q: torch.Tensor
    k: torch.Tensor
    q_labels: torch.Tensor
    k_labels: torch.Tensor
    anchor_loc: torch.Tensor
    key_loc: torch.Tensor


def _draw(kind: str, coords: torch.Tensor, n: int, grid: int, generator) -> torch.Tensor:
    """min(n, N) distinct indices into coords. "sag" can reflect a point onto one already drawn: the
    duplicates are dropped and the draw topped up uniformly from the points not drawn."""
    if n >= coords.shape[0]:
        return torch.randperm(coords.shape[0], generator=generator, device=coords.device) \
            if generator is not None else torch.randperm(coords.shape[0], device=coords.device)
    idx = sample(kind, coords, n, grid=grid, generator=generator).index
    if kind == "sag":  # a reflection can land on a drawn point: keep the first occurrence, order kept
        seen, first = torch.unique(idx, return_inverse=True)
        pos = torch.full((seen.numel(),), idx.numel(), dtype=torch.long, device=idx.device)
        pos.scatter_reduce_(0, first, torch.arange(idx.numel(), device=idx.device), "amin")
        idx = idx[pos.sort().values]
        if idx.numel() < n:
            free = torch.ones(coords.shape[0], dtype=torch.bool, device=idx.device)
            free[idx] = False
            rest = free.nonzero()[:, 0]
            pick = torch.randperm(rest.numel(), generator=generator, device=idx.device)[: n - idx.numel()] \
                if generator is not None else torch.randperm(rest.numel(), device=idx.device)[: n - idx.numel()]
            idx = torch.cat([idx, rest[pick]])
    return idx


def sample_locations(groups: torch.Tensor, spatial_shape: Sequence[int], n_anchors: Count, n_keys: Count,
                     sampler: str = "sg", grid: int = 4, generator: Optional[torch.Generator] = None):
    """Per group, key locations K_g and anchor locations A_g ⊆ K_g (module docstring).

    groups (B,) int64; spatial_shape: the pixel grid S' (L = Π S'). Counts above L mean all L locations.
    Returns (anchor_loc (B, a) int64, key_loc (B, m) int64) with key_loc[:, :a] == anchor_loc, a = min(n_anchors,
    L), m = min(n_keys, L): every image has the same number of rows.
    Raises ValueError for a bad count, a sampler outside PIXEL_SAMPLERS, or n_anchors > n_keys.
    """
    check_count("gcl_pixel_anchors", n_anchors)
    check_count("gcl_pixel_keys", n_keys)
    if sampler not in PIXEL_SAMPLERS:
        raise ValueError(f"method.gcl_pixel_sampler must be one of {PIXEL_SAMPLERS}, got {sampler!r}")
    L = 1
    for s in spatial_shape:
        L *= int(s)
    a = L if n_anchors == ALL else min(int(n_anchors), L)
    m = L if n_keys == ALL else min(int(n_keys), L)
    if a > m:
        raise ValueError(f"method.gcl_pixel_anchors ({n_anchors!r}) must not exceed method.gcl_pixel_keys "
                         f"({n_keys!r}): the anchors' positives are drawn from the keys")
    dev = groups.device
    coords = unit_coords(torch.arange(L, device=dev), spatial_shape)
    codes, inverse = torch.unique(groups, return_inverse=True)
    per_group = []
    for _ in range(codes.numel()):
        keys = _draw(sampler, coords, m, grid, generator)
        inner = _draw(sampler, coords[keys], a, grid, generator)
        chosen = torch.zeros(keys.numel(), dtype=torch.bool, device=dev)
        chosen[inner] = True
        per_group.append((keys[inner], keys[~chosen]))
    a_min = min(x.numel() for x, _ in per_group)
    r_min = min(y.numel() + x.numel() - a_min for x, y in per_group)
    anchors = torch.stack([x[:a_min] for x, _ in per_group])
    rest = torch.stack([torch.cat([x[a_min:], y])[:r_min] for x, y in per_group])
    key_loc = torch.cat([anchors, rest], dim=1)[inverse]
    return anchors[inverse], key_loc


def pixel_rows(maps: torch.Tensor, groups: torch.Tensor, n_anchors: Count, n_keys: Count, sampler: str = "sg",
               grid: int = 4, generator: Optional[torch.Generator] = None) -> PixelRows:
    """Normalised, sampled anchor and key rows of the pixel maps (module docstring for the layout).

    maps (V·B, C, *S') = [view 1 | … | view V] (V = 2 in GCL); groups (B,) int64 meta-label bin per image.
    """
    n2, C = maps.shape[:2]
    B = groups.shape[0]
    if n2 % B:
        raise ValueError(f"maps hold {n2} images, not a multiple of the {B} meta-labels")
    V, spatial = n2 // B, tuple(maps.shape[2:])
    L = maps[0, 0].numel()
    anchor_loc, key_loc = sample_locations(groups, spatial, n_anchors, n_keys, sampler, grid, generator)
    a = anchor_loc.shape[1]
    # gather the sampled locations first, then normalise only those rows (normalisation is per pixel
    # vector, so the order does not matter, and the full maps are 2·L/(2·m) times larger)
    m = key_loc.shape[1]
    raw = maps.reshape(V, B, C, L).gather(3, key_loc[None, :, None, :].expand(V, B, C, m))      # (V, B, C, m)
    feats = torch.nn.functional.normalize(raw, dim=2).transpose(2, 3)                          # (V, B, m, C)
    _, codes = torch.unique(groups, return_inverse=True)
    labels = codes[:, None] * L + key_loc                                                     # (B, m)
    q = feats[:, :, :a].reshape(-1, C)
    rest = feats[:, :, a:].reshape(-1, C)
    q_lab = labels[:, :a].reshape(-1).repeat(V)
    k_lab = torch.cat([q_lab, labels[:, a:].reshape(-1).repeat(V)])
    return PixelRows(q, torch.cat([q, rest]), q_lab, k_lab, anchor_loc, key_loc)
