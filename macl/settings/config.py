"""Every setting of a pre-training run, as dataclasses; load from TOML/JSON/YAML, override from strings.

A run is described by one `PretrainConfig` with four parts:

- `net`    (`NetConfig`):    the U-Net backbone (2D or 3D, base width F, depth, normalisation).
- `method` (`MethodConfig`): the pre-training objective (MACL, PCL, SimCLR) and its loss settings
  (τ, the positional threshold, λ1–λ3, the L_d mode, the asymmetric-branch geometry).
- `optim`  (`OptimConfig`):  SGD with momentum 0.9, weight decay 1e-5, cosine decay per iteration.
- `train`  (`TrainConfig`):  steps, seed, device, mixed precision, logging and checkpoint cadence.

Defaults follow the public MACL code (F = 32, depth 4, τ = 0.1, threshold 0.1, λ = (1.0, 0.5, 1.0),
lr 0.01, the τ/0.07 rescale on); the paper's alternatives are options (see `MethodConfig`).

Every dataclass checks its values in `__post_init__` and raises `ValueError` naming the bad value.
`to_dict` / `from_dict` round-trip through plain JSON types, which is what checkpoints store.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from .fields import coerce_fields, require_yaml

from .presets import DEFAULT_PRESET, check_preset, resolve_head_norm

NORMS = ("batch", "instance", "none")
DENSE_MODES = ("location", "voxel")
DENSE_NEGATIVES = ("image", "batch")
IMAGE_SOURCES = ("decoder", "encoder")
AMP_DTYPES = ("float16", "bfloat16")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class NetConfig:
    """The U-Net backbone shared by pre-training and fine-tuning.

    dims: 2 (slices, input (B, C, H, W)) or 3 (patches, input (B, C, D, H, W)).
    in_channels: image channels C.
    base_width: F, the width of the first stage; stages have F, 2F, …, 2^(depth−1)F channels and the
        bottleneck ("center") has 2^depth·F (16F = 512 for the paper's F = 32, depth = 4).
    depth: number of max-pool stages (4 in the paper); inputs must be divisible by 2^depth.
    norm: "batch" (the public code), "instance" or "none". For a MONAI network: the norm of MACL's pixel head.
    arch: "unet" (the built-in U-Net above) or a MONAI encoder–decoder "monai:BasicUNet" | "monai:UNet" |
        "monai:DynUNet" | "monai:SwinUNETR" (`macl.nets.monai_maps`, docs/monai.md); base_width and depth are
        then unused and the network comes from `arch_args`.
    arch_args: the MONAI network's constructor arguments except spatial_dims (= dims), in_channels and
        out_channels (JSON types, e.g. {"features": [32, 32, 64, 128, 256, 32]}).
    taps: module paths {"bottleneck", "decoder", "er"} overriding the built-in tap map (`macl.nets.taps`).
    """

    dims: int = 2
    in_channels: int = 1
    base_width: int = 32
    depth: int = 4
    norm: str = "batch"
    arch: str = "unet"
    arch_args: Optional[dict] = None
    taps: Optional[dict] = None

    def __post_init__(self) -> None:
        coerce_fields(self, 'net.')  # types first: the checks below compare numbers
        _check(self.arch == "unet" or self.arch.startswith("monai:"),
               f"net.arch must be 'unet' or 'monai:<Name>' (monai:BasicUNet, monai:UNet, monai:DynUNet), got {self.arch!r}")
        for name in ("arch_args", "taps"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, dict), f"net.{name} must be a mapping or None, got {value!r}")
            if value is not None:  # the JSON form (tuples → lists): stored and given configs compare equal
                setattr(self, name, json.loads(json.dumps(value)))
        _check(self.dims in (2, 3), f"net.dims must be 2 or 3, got {self.dims!r}")
        _check(int(self.in_channels) >= 1, f"net.in_channels must be >= 1, got {self.in_channels!r}")
        _check(int(self.base_width) >= 1, f"net.base_width must be >= 1, got {self.base_width!r}")
        _check(int(self.depth) >= 1, f"net.depth must be >= 1, got {self.depth!r}")
        _check(self.norm in NORMS, f"net.norm must be one of {NORMS}, got {self.norm!r}")


@dataclass
class MethodConfig:
    """The pre-training objective. Fields a method does not use are ignored by it.

    name: "macl" | "pcl" | "simclr" | "gcl" (see `macl.methods.METHODS`).
    temperature: τ of every contrastive term (0.1).
    threshold: positional threshold; slices/patches whose normalised positions differ by < threshold are
        positives (0.1 for CHD/KiTS, 0.05 for BraTS). Used by MACL (L_g, L_d) and PCL.
    rescale_by_base_temperature: multiply every contrastive term by τ/base_temperature, as the public
        code's SupConLoss does (True); False gives the plain SupCon of the paper's equations.
    base_temperature: 0.07 (SupCon's).
    lambda_g, lambda_d, lambda_er: λ1, λ2, λ3 in L = λ1·L_g + λ2·L_d + λ3·L_ER (1.0, 0.5, 1.0).
    dense_mode: L_d's form. "location" (the paper): per grid location s, contrast the 2B features at s
        across the batch. "voxel" (beyond the paper): every voxel against every voxel of the same image
        (dense_negatives="image") or of the whole batch ("batch"), positive = the same voxel in the other view.
    dense_symmetric: for "voxel", average both directions (aux→dominant and dominant→aux).
    decoder_blocks: k, the decoder blocks the dominant branch runs (2). Requires dominant_scale·2^k = 1 so
        that the dominant pixel map is aligned voxel-for-voxel with the auxiliary bottleneck map.
    dominant_scale: down-sampling factor of the dominant branch's input (0.25).
    proj_dim: output size of the image heads; None = the method's default (MACL 128, PCL/SimCLR 2^depth·F).
    dominant_image_source: where the dominant image head reads from: "decoder" (public code and figure)
        or "encoder" (the paper's equation: the dominant bottleneck).
    position_axis: when batches carry positions of shape (B, P) (e.g. a 3D patch's position per axis), the
        column used as the meta-label; None requires positions of shape (B,).
    impl: passed to every `macl_kernels` call ("auto" | "torch" | "triton" | "reference").
    meta_labels: GCL's meta-labels, one contrastive loss per entry and branch: "position" (the slice/patch
        position: image positives |Δpos| < threshold, pixel positives in the same position bin of width
        threshold), "volume" (the volume index) or the name of a per-volume attribute column of the CSV given
        to the data (`macl.data.metalabels`). A comma-separated string is accepted.
    gcl_rho: GCL's Gradient Filter: the fraction of each pixel anchor's negatives kept (the largest-gradient
        ones); 1.0 switches the filter off.
    gcl_mitigator: GCL's Gradient Mitigator (PCGrad projection of conflicting per-meta-label gradients on
        each branch's features); False sums the per-label gradients unchanged.
    pixel_dim: width of GCL's pixel head; None = the width of the last decoder block it runs.
    gcl_pixel_anchors, gcl_pixel_keys: GCL's pixel branch: anchor and key locations per image, drawn per
        meta-label bin (anchors ⊆ keys, both views; docs/gcl.md), or "all" (every pixel, the exact formula).
    gcl_pixel_sampler: how those locations are drawn: "sg" (stratified over a 4×4(×4) grid), "sag", "ns".
    preset: "faithful" (the public code) or "robust" (anti-collapse head, augmentations scaled to the crop);
        decides every setting left at None below and `data.reference_size` (see `macl.settings.presets`).
    head_norm: MACL's image heads: "none" (GAP → Linear → ReLU → Linear, the public code) or "batch"
        (BatchNorm1d after the first Linear, as SimCLR v2 / MoCo v3 heads); None = the preset's.
    """

    name: str = "macl"
    temperature: float = 0.1
    threshold: float = 0.1
    rescale_by_base_temperature: bool = True
    base_temperature: float = 0.07
    lambda_g: float = 1.0
    lambda_d: float = 0.5
    lambda_er: float = 1.0
    dense_mode: str = "location"
    dense_negatives: str = "batch"
    dense_symmetric: bool = False
    decoder_blocks: int = 2
    dominant_scale: float = 0.25
    proj_dim: Optional[int] = None
    dominant_image_source: str = "decoder"
    position_axis: Optional[int] = None
    impl: str = "auto"
    meta_labels: list = field(default_factory=lambda: ["position", "volume"])
    gcl_rho: float = 0.5
    gcl_mitigator: bool = True
    pixel_dim: Optional[int] = None
    gcl_pixel_anchors: Union[int, str] = 32
    gcl_pixel_keys: Union[int, str] = 64
    gcl_pixel_sampler: str = "sg"
    preset: str = DEFAULT_PRESET
    head_norm: Optional[str] = None

    def __post_init__(self) -> None:
        coerce_fields(self, 'method.')  # types first: the checks below compare numbers
        check_preset(self.preset)
        resolve_head_norm(self.head_norm, self.preset)  # raises for a bad head_norm
        _check(isinstance(self.name, str) and self.name != "", f"method.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.meta_labels, str):
            self.meta_labels = [x.strip() for x in self.meta_labels.split(",") if x.strip()]
        self.meta_labels = list(self.meta_labels)  # a list: the JSON form, so stored configs compare equal
        _check(len(self.meta_labels) >= 1 and all(isinstance(x, str) and x for x in self.meta_labels)
               and len(set(self.meta_labels)) == len(self.meta_labels),
               f"method.meta_labels must be distinct non-empty names, got {self.meta_labels!r}")
        _check(isinstance(self.gcl_rho, (int, float)) and 0 < self.gcl_rho <= 1,
               f"method.gcl_rho must be in (0, 1], got {self.gcl_rho!r}")
        for name in ("gcl_pixel_anchors", "gcl_pixel_keys"):
            v = getattr(self, name)
            _check(v == "all" if isinstance(v, str) else (type(v) is int and v >= 1),
                   f"method.{name} must be 'all' or an int >= 1, got {v!r}")
        _check(not (type(self.gcl_pixel_anchors) is int and type(self.gcl_pixel_keys) is int)
               or self.gcl_pixel_anchors <= self.gcl_pixel_keys,
               f"method.gcl_pixel_anchors ({self.gcl_pixel_anchors}) must not exceed method.gcl_pixel_keys "
               f"({self.gcl_pixel_keys}): anchors are drawn among the keys")
        _check(self.gcl_pixel_sampler in ("ns", "sg", "sag"),
               f"method.gcl_pixel_sampler must be ns|sg|sag, got {self.gcl_pixel_sampler!r}")
        _check(self.pixel_dim is None or int(self.pixel_dim) >= 1, f"method.pixel_dim must be >= 1 or None, got {self.pixel_dim!r}")
        _check(self.temperature > 0, f"method.temperature must be > 0, got {self.temperature!r}")
        _check(self.threshold > 0, f"method.threshold must be > 0, got {self.threshold!r}")
        _check(self.base_temperature > 0, f"method.base_temperature must be > 0, got {self.base_temperature!r}")
        for name in ("lambda_g", "lambda_d", "lambda_er"):
            value = getattr(self, name)
            _check(value >= 0, f"method.{name} must be >= 0, got {value!r}")
        _check(self.dense_mode in DENSE_MODES, f"method.dense_mode must be one of {DENSE_MODES}, got {self.dense_mode!r}")
        _check(self.dense_negatives in DENSE_NEGATIVES,
               f"method.dense_negatives must be one of {DENSE_NEGATIVES}, got {self.dense_negatives!r}")
        _check(int(self.decoder_blocks) >= 1, f"method.decoder_blocks must be >= 1, got {self.decoder_blocks!r}")
        _check(0 < self.dominant_scale <= 1, f"method.dominant_scale must be in (0, 1], got {self.dominant_scale!r}")
        _check(self.proj_dim is None or int(self.proj_dim) >= 1, f"method.proj_dim must be >= 1 or None, got {self.proj_dim!r}")
        _check(self.dominant_image_source in IMAGE_SOURCES,
               f"method.dominant_image_source must be one of {IMAGE_SOURCES}, got {self.dominant_image_source!r}")
        _check(self.impl in ("auto", "torch", "triton", "reference"),
               f"method.impl must be auto|torch|triton|reference, got {self.impl!r}")

    @property
    def image_head_norm(self) -> str:
        """head_norm, or the preset's when None: "none" | "batch"."""
        return resolve_head_norm(self.head_norm, self.preset)

    @property
    def contrast_scale(self) -> float:
        """The factor τ/base_temperature applied to contrastive terms (1.0 when the rescale is off)."""
        return self.temperature / self.base_temperature if self.rescale_by_base_temperature else 1.0


@dataclass
class OptimConfig:
    """SGD (momentum 0.9, weight decay 1e-5) with cosine decay of the learning rate per iteration.

    lr: initial learning rate (0.01 in every public script; the paper says 0.1).
    min_lr: the value the cosine reaches at the last step (0).
    warmup_steps: linear warm-up from 0 before the cosine (0: none, as the public code).
    grad_clip_norm: clip the global gradient norm to this value; None disables clipping.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    grad_clip_norm: Optional[float] = None

    def __post_init__(self) -> None:
        coerce_fields(self, 'optim.')  # types first: the checks below compare numbers
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr!r}")
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum!r}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        _check(int(self.warmup_steps) >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _check(self.grad_clip_norm is None or self.grad_clip_norm > 0,
               f"optim.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm!r}")


@dataclass
class TrainConfig:
    """The loop: how long, where, how reproducibly, how often to log and checkpoint.

    steps: total optimiser steps (the cosine schedule spans exactly these).
    seed: seeds Python, NumPy and torch before the model is built.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", …
    amp: mixed precision on CUDA (never on CPU, whatever this says).
    amp_dtype: "float16" (with a gradient scaler) or "bfloat16".
    deterministic: ask torch for deterministic algorithms (warn-only) for the duration of the run.
    log_every: write a JSON line every this many steps (the last step is always written).
    checkpoint_every: write checkpoints/step_XXXXXXX.pt and latest.pt every this many steps (0: only final).
    sync_batchnorm: under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only).
    diagnostics: collapse diagnostics per loss term (`macl.diagnostics`): spreads on logged steps, a warning
        when a term stays at its constant-embedding value, a verdict per term at the end.
    collapse_window: consecutive near-constant steps that count as a collapse (100).
    diag_grad_every: measure each term's share of the encoder gradient every this many steps (0: never).
    """

    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "float16"
    deterministic: bool = True
    log_every: int = 1
    checkpoint_every: int = 500
    sync_batchnorm: bool = False
    diagnostics: bool = True
    collapse_window: int = 100
    diag_grad_every: int = 100

    def __post_init__(self) -> None:
        coerce_fields(self, 'train.')  # types first: the checks below compare numbers
        _check(int(self.collapse_window) >= 1, f"train.collapse_window must be >= 1, got {self.collapse_window!r}")
        _check(int(self.diag_grad_every) >= 0, f"train.diag_grad_every must be >= 0, got {self.diag_grad_every!r}")
        _check(int(self.steps) >= 1, f"train.steps must be >= 1, got {self.steps!r}")
        _check(self.amp_dtype in AMP_DTYPES, f"train.amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        _check(int(self.log_every) >= 1, f"train.log_every must be >= 1, got {self.log_every!r}")
        _check(int(self.checkpoint_every) >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every!r}")


@dataclass
class PretrainConfig:
    """One pre-training run: backbone, objective, optimiser, loop."""

    net: NetConfig = field(default_factory=NetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {"net": NetConfig, "method": MethodConfig, "optim": OptimConfig, "train": TrainConfig}


def to_dict(config: PretrainConfig) -> dict:
    """The config as nested plain dicts (JSON types only)."""
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any]) -> PretrainConfig:
    """Build a `PretrainConfig` from nested dicts; missing keys take defaults.

    Raises:
        ValueError: an unknown section or key (named), or a bad value.
    """
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    parts = {}
    for section, cls in _SECTIONS.items():
        values = dict(data.get(section) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - names
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)} in config section {section!r}; known: {sorted(names)}")
        parts[section] = cls(**values)
    return PretrainConfig(**parts)


def load_config(path: str | os.PathLike) -> PretrainConfig:
    """Read a config file: .toml, .json, or .yaml/.yml (the last needs PyYAML).

    Raises:
        ValueError: an unsupported extension, or bad content (see `from_dict`).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        from macl.settings.toml_compat import loads  # tomllib, or tomli on Python < 3.11

        with open(path, encoding="utf-8") as fh:
            data = loads(fh.read())
    elif ext == ".json":
        with open(path) as fh:
            data = json.load(fh)
    elif ext in (".yaml", ".yml"):
        require_yaml(path)
        import yaml  # optional dependency: macl[yaml]

        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    else:
        raise ValueError(f"config file must end in .toml, .json, .yaml or .yml, got {path!r}")
    return from_dict(data)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """Return a new config with "section.key=value" overrides applied (e.g. "optim.lr=0.1").

    Values are parsed as Python literals where possible ("3" → 3, "none" → None, "true" → True), else kept
    as strings.

    Raises:
        ValueError: an override without "=" or without "section.key", or an unknown section/key.
    """
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        if dotted.count(".") != 1:
            raise ValueError(f"override key must be section.key, got {dotted!r}")
        section, key = dotted.split(".")
        if section not in data:
            raise ValueError(f"unknown config section {section!r} in override {item!r}")
        if key not in data[section]:
            raise ValueError(f"unknown key {key!r} in config section {section!r} (override {item!r})")
        data[section][key] = _parse_value(value)
    return from_dict(data)
