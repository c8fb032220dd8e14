"""Where samples come from: 2D slices and 3D patches, with their normalised positions.

Positions (MACL.md "Setting"): slice ``i`` of a volume with ``n`` slices along the slice axis has
position ``(i + 1) / n``, in (0, 1]. A 3D patch covering voxels ``[start, start + size)`` of an
axis of length ``n`` has position ``min(start + size, n) / n`` along that axis: the same rule
(a patch of one voxel at ``i`` gets ``(i + 1) / n``; non-overlapping patches tiling the axis get
``(k + 1) / K``). Patches larger than the axis (padded) get 1.

Arrays are channel-first: volumes (C, X, Y, Z), slices (C, X, Y), the slice axis is spatial
axis 2 (Z) by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def slice_positions(n: int) -> np.ndarray:
    """Positions ``(i + 1) / n`` of the ``n`` slices of a volume, float64 (n,).

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"a volume needs at least one slice, got n={n}")
    return (np.arange(n, dtype=np.float64) + 1.0) / n


def patch_position(start: int | Sequence[int], size: int | Sequence[int],
                   n: int | Sequence[int]) -> np.ndarray:
    """Normalised position(s) ``min(start + size, n) / n`` of a patch (per axis), float64.

    Args:
        start: first voxel of the patch along each axis (negative when the patch is padded).
        size: patch size along each axis.
        n: volume size along each axis.

    Returns:
        float64 array with the broadcast shape of the arguments, values in (0, 1].
    """
    s, z, m = (np.asarray(v, dtype=np.float64) for v in (start, size, n))
    if np.any(m < 1) or np.any(z < 1):
        raise ValueError(f"sizes must be >= 1, got size={size}, n={n}")
    end = np.clip(s + z, np.minimum(z, m), m)
    return end / m


def window(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """The window ``[start, start + size)`` over the last ``len(size)`` axes, padding outside.

    Args:
        arr: (..., *spatial) array.
        start: first index per windowed axis (may be negative or run past the end).
        size: window size per windowed axis.
        pad_value: value of voxels outside ``arr``.

    Returns:
        array (..., *size) of ``arr``'s dtype (a copy).
    """
    k = len(size)
    lead = arr.shape[: arr.ndim - k]
    out = np.full(lead + tuple(int(s) for s in size), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for st, sz, n in zip(start, size, arr.shape[arr.ndim - k:]):
        lo, hi = max(int(st), 0), min(int(st) + int(sz), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(st), hi - int(st)))
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    return out


def crop_start(shape: Sequence[int], size: Sequence[int], mode: str = "random",
               rng: np.random.Generator | None = None) -> tuple[int, ...]:
    """Start of a ``size`` window in ``shape``: random or centred where it fits, centred padding where not.

    Args:
        shape: spatial shape of the array; size: window size (same length).
        mode: ``"random"`` (uniform over valid starts) or ``"centre"``.
        rng: numpy Generator for ``"random"``.

    Raises:
        ValueError: unknown ``mode`` or length mismatch.
    """
    if len(shape) != len(size):
        raise ValueError(f"shape {tuple(shape)} and size {tuple(size)} differ in length")
    if mode not in ("random", "centre"):
        raise ValueError(f"mode must be 'random' or 'centre', got {mode!r}")
    out = []
    for n, s in zip(shape, size):
        if n <= s:
            out.append(-((s - n) // 2))
        elif mode == "centre":
            out.append((n - s) // 2)
        else:
            if rng is None:
                raise ValueError("mode='random' needs an rng")
            out.append(int(rng.integers(0, n - s + 1)))
    return tuple(out)


@dataclass(frozen=True)
class SliceRef:
    """Slice ``index`` of volume ``volume`` along the slice axis, with its position (index+1)/n."""

    volume: int
    index: int
    position: float


def enumerate_slices(shapes: Sequence[Sequence[int]], axis: int = 2) -> list[SliceRef]:
    """Every slice of every volume along spatial ``axis``, in order.

    Args:
        shapes: spatial shapes (X, Y, Z) of the volumes.
        axis: the slice axis (0, 1 or 2).

    Returns:
        one SliceRef per slice; positions as :func:`slice_positions`.
    """
    out = []
    for v, shp in enumerate(shapes):
        n = int(shp[axis])
        for i, p in enumerate(slice_positions(n)):
            out.append(SliceRef(v, i, float(p)))
    return out


def extract_slice(volume: np.ndarray, index: int, axis: int = 2) -> np.ndarray:
    """Slice ``index`` along spatial ``axis`` of a (C, X, Y, Z) volume -> (C, *in-plane)."""
    if not 0 <= index < volume.shape[1 + axis]:
        raise IndexError(f"slice {index} out of range for {volume.shape[1 + axis]} slices")
    return np.take(volume, index, axis=1 + axis)


def sample_patch_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator,
                       foreground: np.ndarray | None = None) -> tuple[int, ...]:
    """Random start of a 3D patch; centred on a random ``foreground`` voxel when one is given.

    Args:
        shape: (X, Y, Z) of the volume; size: patch size.
        rng: numpy Generator.
        foreground: (N, 3) voxel coordinates to centre on (one is drawn), or None for uniform.

    Returns:
        start per axis, clipped so the patch stays inside the volume where it fits.
    """
    if foreground is None or len(foreground) == 0:
        return crop_start(shape, size, "random", rng)
    centre = foreground[int(rng.integers(len(foreground)))]
    out = []
    for c, n, s in zip(centre, shape, size):
        if n <= s:
            out.append(-((s - n) // 2))
        else:
            out.append(int(np.clip(int(c) - s // 2, 0, n - s)))
    return tuple(out)
