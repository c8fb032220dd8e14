"""The four views MACL trains on (MACL.md "Views").

- ``img1``, ``img2``: intensity-only views of the same crop, voxel-aligned with it and with each
  other (the pixel- and feature-level losses compare them location by location).
- ``img3``, ``img4``: independent spatial transforms of ``img1`` and ``img2`` (image-level loss).

Two presets:

- ``"code"`` (default; the public MACL code): each intensity view is an independent chain
  (8-bit quantisation as the code's PIL round trip) brightness factor U(0, 1) -> contrast factor
  U(0.8, 1.2) around the mean -> Gaussian blur k=3, sigma U(1, 3) -> min-max.
  (A brightness factor near 0 blanks a view to all zeros, rarely, exactly as the code's
  ``ColorJitter(brightness=(0, 1))`` on 8-bit images does; narrow ``brightness`` to avoid it.)
- ``"paper"``: intensity views are the identity (img1 = img2 = the min-max normalised crop).
- ``"zscore"``: the views keep the intensity scale fine-tuning and inference see (the pre-processed, z-scored
  volume, :mod:`macl.data.preprocess`; no per-crop min-max, no 8-bit quantisation, no clipping to [0, 1]): each
  view is ``mean + c * (b * x - mean)`` with b U(0.7, 1.3), c U(0.8, 1.2), then with probability 0.5 the
  same Gaussian blur (k=3, sigma U(1, 3)). Fine-tuning input is sharp and z-scored: the ``code`` views show the
  network only per-crop [0, 1] images, always blurred.

Both use the code's spatial transform: mirror each axis with p = 0.5, then with p = 0.67
elastic deformation (alpha U(100, 350), sigma U(14, 17), pixels) + rotation U(0, 2 pi) + scale
U(0.7, 1.3), else a random crop (``crop_scale`` (1, 1) = the code's same-size crop = identity).

Conventions: tensors are (B, C, *spatial) float, spatial = (X, Y) or (X, Y, Z). A spatial
transform maps each output voxel ``x`` (pixel coordinates) to the input position
``q = F (p - c) + c`` with ``c`` the centre, ``F`` the mirror (diag of +-1) and
``p = c + s R (x - c + d(x))`` (deform branch: ``d`` the elastic displacement, ``R`` the
rotation, ``s`` the scale, multiplying the sampling grid as batchgenerators does: s > 1 shows
more of the image) or ``p = c + f (x - c) + t`` (crop branch). Out-of-image samples are 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Range = tuple[float, float]
VIEW_PRESETS = ("code", "paper", "zscore")


@dataclass
class IntensityViewConfig:
    """Intensity-only augmentation (no voxel moves). ``enabled=False`` is the identity."""

    enabled: bool = True
    brightness: Range = (0.0, 1.0)
    contrast: Range = (0.8, 1.2)
    blur_kernel: int = 3
    blur_sigma: Range = (1.0, 3.0)
    quantize_levels: int | None = 256
    blur_prob: float = 1.0
    clip: bool = True


@dataclass
class SpatialViewConfig:
    """Spatial augmentation for img3 / img4 (see module docstring for the exact mapping).

    Attributes:
        flip_prob: probability of mirroring each axis in ``flip_axes`` (None: every spatial axis).
        p_deform: probability of the deform branch (elastic + rotation + scale), else crop branch.
        elastic: use the elastic displacement in the deform branch.
        elastic_alpha / elastic_sigma: displacement magnitude and smoothing, pixels.
        reference_size: if set, alpha and sigma are pixels at this image size and are rescaled
            to the actual mean in-plane size ``n``: with ``r = n / reference_size``, sigma x r and alpha x
            r^(1 + ndim/2) (r² in 2D). Smoothing U(-1, 1) noise with a Gaussian of sigma divides its amplitude
            by about sigma^(ndim/2), so this keeps the displacement the same fraction of the crop (and the
            local strain the same) as at ``reference_size``; alpha x r alone would keep it fixed in pixels.
        rotation: angle range (radians) in the (X, Y) plane; rotation_other: about X and Y (3D).
        scale: isotropic scale range of the sampling grid.
        crop_scale: crop-branch side fraction range; (1, 1) is the identity.
        mode: interpolation for images (``"bilinear"``; labels use ``"nearest"``).
    """

    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] | None = None
    p_deform: float = 0.67
    elastic: bool = True
    elastic_alpha: Range = (100.0, 350.0)
    elastic_sigma: Range = (14.0, 17.0)
    reference_size: int | None = None
    rotation: Range = (0.0, 2.0 * math.pi)
    rotation_other: Range = (0.0, 0.0)
    scale: Range = (0.7, 1.3)
    crop_scale: Range = (1.0, 1.0)
    mode: str = "bilinear"


@dataclass
class ViewConfig:
    """Both halves plus the min-max normalisation the code applies around them."""

    preset: str = "code"
    intensity: IntensityViewConfig = field(default_factory=IntensityViewConfig)
    spatial: SpatialViewConfig = field(default_factory=SpatialViewConfig)
    minmax: bool = True

    @classmethod
    def from_preset(cls, name: str) -> "ViewConfig":
        """``"code"`` (public MACL code), ``"paper"`` (identity intensity views) or ``"zscore"`` (the fine-tuning
        input's intensity scale; module docstring).

        Raises:
            ValueError: unknown preset name.
        """
        if name == "code":
            return cls("code")
        if name == "paper":
            return cls("paper", IntensityViewConfig(enabled=False))
        if name == "zscore":
            return cls("zscore", IntensityViewConfig(brightness=(0.7, 1.3), quantize_levels=None, blur_prob=0.5,
                                                     clip=False), minmax=False)
        raise ValueError(f"view preset must be one of {VIEW_PRESETS}, got {name!r}")


def _uniform(rng: Range, n: int, g: torch.Generator | None) -> torch.Tensor:
    lo, hi = float(rng[0]), float(rng[1])
    if hi < lo:
        raise ValueError(f"range must be (low, high) with low <= high, got {rng}")
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample (x - min) / (max - min + eps) over all non-batch dims; (B, ...) -> same."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo + eps)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding, one sigma per sample.

    Args:
        x: (B, C, *spatial) float; sigma: (B,) in pixels; kernel: odd kernel size.
    """
    if kernel % 2 != 1 or kernel < 1:
        raise ValueError(f"blur kernel must be an odd positive size, got {kernel}")
    r = kernel // 2
    nd = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = []
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    for b in range(x.shape[0]):
        k = torch.exp(-0.5 * (t / float(sigma[b])) ** 2)
        k = k / k.sum()
        y = x[b:b + 1]
        c = y.shape[1]
        for ax in range(nd):
            pad = [0, 0] * nd
            pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = r
            mode = "reflect" if y.shape[2 + ax] > r else "replicate"
            shape = [1] * nd
            shape[ax] = kernel
            w = k.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
            y = conv(F.pad(y, pad, mode=mode), w, groups=c)
        out.append(y)
    return torch.cat(out)


def intensity_view(x: torch.Tensor, cfg: IntensityViewConfig, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """One intensity-only view of ``x`` (B, C, *spatial) in [0, 1]; voxels never move.

    Returns:
        tensor like ``x`` (not min-max normalised; :func:`make_views` does that).
    """
    if not cfg.enabled:
        return x.clone()
    b = x.shape[0]
    bshape = (b,) + (1,) * (x.ndim - 1)
    levels = cfg.quantize_levels

    def q(y: torch.Tensor) -> torch.Tensor:
        return y if levels is None else torch.round(y * (levels - 1)) / (levels - 1)

    def c(y: torch.Tensor) -> torch.Tensor:
        return y.clamp(0, 1) if cfg.clip else y

    y = q(c(x))
    y = q(c(y * _uniform(cfg.brightness, b, generator).to(x.dtype).view(bshape)))
    mean = y.reshape(b, -1).mean(1).view(bshape)
    if levels is not None:
        mean = q(mean)
    y = q(c(mean + _uniform(cfg.contrast, b, generator).to(x.dtype).view(bshape) * (y - mean)))
    if cfg.blur_kernel > 1:
        sigma = _uniform(cfg.blur_sigma, b, generator)
        if cfg.blur_prob >= 1:
            y = q(gaussian_blur(y, sigma, cfg.blur_kernel))
        else:  # blur a random subset of the samples (the draw is made for every sample, blurred or not)
            pick = torch.rand(b, generator=generator) < cfg.blur_prob
            if bool(pick.any()):
                y = y.clone()
                y[pick] = q(gaussian_blur(y[pick], sigma[pick], cfg.blur_kernel))
    return y


@dataclass
class SpatialParams:
    """Per-sample spatial transform (module docstring): q = F (c + A (x - c + d(x)) + t - c) + c.

    Attributes:
        flips: (B, ndim) bool, mirrored axes.
        matrix: (B, ndim, ndim) float64 A (s R in the deform branch, f I in the crop branch).
        translation: (B, ndim) float64 t (pixels).
        displacement: (B, ndim, *spatial) float32 d (pixels) or None.
        deform: (B,) bool, which samples took the deform branch.
        angle / scale: (B,) float64, the in-plane rotation and scale drawn (crop branch: 0 / f).
    """

    flips: torch.Tensor
    matrix: torch.Tensor
    translation: torch.Tensor
    displacement: torch.Tensor | None
    deform: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor


def _rotation(nd: int, angle: float, a0: float = 0.0, a1: float = 0.0) -> torch.Tensor:
    def rot(i: int, j: int, a: float) -> torch.Tensor:
        m = torch.eye(nd, dtype=torch.float64)
        m[i, i], m[i, j], m[j, i], m[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        return m
    if nd == 2:
        return rot(0, 1, angle)
    return rot(0, 1, angle) @ rot(0, 2, a1) @ rot(1, 2, a0)


def _smooth_noise(shape: tuple[int, ...], sigma: float, g: torch.Generator | None) -> torch.Tensor:
    """U(-1, 1) noise (ndim, *shape) smoothed by a Gaussian (zero padding, radius 4 sigma).

    The zero-padded convolution along each axis is a banded (n, n) matrix product (much faster on
    CPU than conv1d with a long kernel).
    """
    nd = len(shape)
    y = torch.rand((nd,) + shape, generator=g) * 2 - 1
    for ax, n in enumerate(shape):
        r = int(math.ceil(4 * sigma))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        band = torch.where(diff.abs() <= r, k[(diff + r).clamp(0, 2 * r)], torch.zeros(()))
        y = (y.movedim(ax + 1, -1) @ band.T).movedim(-1, ax + 1)
    return y.contiguous()


def sample_spatial_params(cfg: SpatialViewConfig, batch: int, shape: tuple[int, ...],
                          generator: torch.Generator | None = None) -> SpatialParams:
    """Draw one transform per sample for images of spatial ``shape`` (2 or 3 dims)."""
    nd = len(shape)
    axes = range(nd) if cfg.flip_axes is None else cfg.flip_axes
    flips = torch.zeros(batch, nd, dtype=torch.bool)
    for ax in axes:
        flips[:, ax] = torch.rand(batch, generator=generator) < cfg.flip_prob
    deform = torch.rand(batch, generator=generator) < cfg.p_deform
    angle = _uniform(cfg.rotation, batch, generator)
    other = [_uniform(cfg.rotation_other, batch, generator) for _ in range(2)]
    scale = _uniform(cfg.scale, batch, generator)
    crop = _uniform(cfg.crop_scale, batch, generator)
    alpha = _uniform(cfg.elastic_alpha, batch, generator)
    sigma = _uniform(cfg.elastic_sigma, batch, generator)
    ratio = 1.0 if cfg.reference_size is None else (sum(shape[:2]) / 2) / cfg.reference_size
    ext = torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    matrix = torch.zeros(batch, nd, nd, dtype=torch.float64)
    trans = torch.zeros(batch, nd, dtype=torch.float64)
    disp = torch.zeros((batch, nd) + tuple(shape)) if (cfg.elastic and bool(deform.any())) else None
    for b in range(batch):
        if deform[b]:
            matrix[b] = scale[b] * _rotation(nd, float(angle[b]), float(other[0][b]), float(other[1][b]))
            if disp is not None:  # sigma x r and alpha x r^(1 + nd/2): the displacement scales with the crop
                disp[b] = (_smooth_noise(tuple(shape), float(sigma[b]) * ratio, generator)
                           * float(alpha[b]) * ratio ** (1 + nd / 2))
        else:
            f = float(crop[b])
            matrix[b] = f * torch.eye(nd, dtype=torch.float64)
            offset = torch.rand(nd, generator=generator, dtype=torch.float64) * ext * (1 - f)
            trans[b] = offset + f * ext / 2 - ext / 2
            angle[b], scale[b] = 0.0, f
    return SpatialParams(flips, matrix, trans, disp, deform, angle, scale)


def sampling_coords(params: SpatialParams, shape: tuple[int, ...]) -> torch.Tensor:
    """Input pixel position sampled by each output voxel: (B, *shape, ndim) float64."""
    nd = len(shape)
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape],
                                      indexing="ij"), -1)  # (*shape, nd)
    rel = (grid - c).unsqueeze(0).expand(params.matrix.shape[0], *grid.shape).clone()
    if params.displacement is not None:
        rel = rel + params.displacement.double().movedim(1, -1)
    p = torch.einsum("bij,b...j->b...i", params.matrix, rel) + params.translation.view(-1, *([1] * nd), nd)
    sign = torch.where(params.flips, -1.0, 1.0).double().view(-1, *([1] * nd), nd)
    return sign * p + c


def apply_spatial(x: torch.Tensor, params: SpatialParams, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` (B, C, *spatial) with ``params``; zeros outside. ``mode="nearest"`` for labels."""
    shape = tuple(x.shape[2:])
    q = sampling_coords(params, shape)
    ext = torch.tensor([max(n - 1, 1) for n in shape], dtype=torch.float64)
    g = (2 * q / ext - 1).flip(-1).to(x.dtype)  # grid_sample wants (..., last axis first)
    return F.grid_sample(x, g, mode=mode, padding_mode="zeros", align_corners=True)


def make_views(x: torch.Tensor, cfg: ViewConfig, generator: torch.Generator | None = None,
               return_params: bool = False) -> dict:
    """The four MACL views of a batch of crops.

    Args:
        x: (B, C, *spatial) float crops (any intensity scale).
        cfg: view settings; generator: torch Generator for reproducibility.
        return_params: also return the SpatialParams of img3 / img4 as ``params3`` / ``params4``.

    Returns:
        dict with ``img1``..``img4`` (B, C, *spatial) float32 tensors.
    """
    base = minmax(x.float()) if cfg.minmax else x.float()
    views = []
    for _ in range(2):
        v = intensity_view(base, cfg.intensity, generator)
        views.append(minmax(v) if cfg.minmax else v)
    shape = tuple(x.shape[2:])
    p3 = sample_spatial_params(cfg.spatial, x.shape[0], shape, generator)
    p4 = sample_spatial_params(cfg.spatial, x.shape[0], shape, generator)
    out = {"img1": views[0], "img2": views[1], "img3": apply_spatial(views[0], p3, cfg.spatial.mode),
           "img4": apply_spatial(views[1], p4, cfg.spatial.mode)}
    if return_params:
        out["params3"], out["params4"] = p3, p4
    return out
