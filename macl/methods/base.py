"""What every pre-training method shares: the batch format, the method interface, and the registry.

A `Batch` carries up to four views of B slices (2D) or patches (3D) and their positional meta-labels:

    img1, img2: (B, C, *S) intensity views of the same slice/patch (voxel-aligned), for L_d and L_ER
    img3, img4: (B, C, *S) spatially transformed views of img1, img2, for the image-level loss L_g
    positions:  (B,) float, the normalised position pos = (i+1)/n_slices of each slice (or of each patch
                along the slice axis); or (B, P) with `MethodConfig.position_axis` naming the column.
    meta:       optional (B, K) float, further meta-labels per sample (GCL: column j is the j-th entry of
                `MethodConfig.meta_labels` other than "position", e.g. the volume index or a CSV attribute code).

A method declares the views it needs in `required_views` (PCL/SimCLR: img3, img4; MACL: all four).
`Method.forward(batch)` returns the named, unweighted loss terms; `Method.combine(terms)` the weighted sum
L that the trainer back-propagates. Every contrastive term goes through `macl_kernels`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..settings.config import MethodConfig, NetConfig

VIEWS = ("img1", "img2", "img3", "img4")


@dataclass
class EmbeddingProbe:
    """What `macl.diagnostics` needs of one contrastive term, recorded by the forward pass (no second forward).

    rows: a callable returning the term's embeddings as (G, N, D) (detached, any dtype; G independent problems of
        N anchors each, D features; normalised by the diagnostics): (1, 2B, D) for an image-level loss, (L, 2B, C)
        for MACL's L_d "location" (L grid locations). Called only on logged steps.
    keys_per_anchor: the terms in each anchor's denominator (2B − 1 for SupCon / NT-Xent over 2B features):
        with every embedding equal the loss is log(keys_per_anchor) × scale.
    scale: the factor applied to the loss (τ/0.07 with the public code's rescale, else 1).
    """

    rows: Callable[[], torch.Tensor]
    keys_per_anchor: int
    scale: float = 1.0


def world_size_of(process_group: Optional[str]) -> int:
    """How many ranks a loss with this `process_group` takes keys from (1 unless "world" under torchrun)."""
    import torch.distributed as dist
    if process_group == "world" and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@dataclass
class Batch:
    """One training batch (see the module docstring for shapes). Views a method does not need may be None."""

    positions: torch.Tensor
    img1: Optional[torch.Tensor] = None
    img2: Optional[torch.Tensor] = None
    img3: Optional[torch.Tensor] = None
    img4: Optional[torch.Tensor] = None
    meta: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        """B, the number of slices/patches."""
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device` (images as float32, positions as float32)."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=non_blocking)
        return Batch(move(self.positions), *(move(getattr(self, v)) for v in VIEWS), meta=move(self.meta))

    @classmethod
    def from_any(cls, obj: Any) -> "Batch":
        """Accept a `Batch`, a mapping with keys positions/img1…img4 and optionally meta (extra keys
        ignored), or a sequence
        (img1, img2, img3, img4, positions, *ignored) as the public code's data loaders yield.

        Raises:
            TypeError: anything else. ValueError: no positions.
        """
        if isinstance(obj, Batch):
            return obj
        if isinstance(obj, Mapping):
            if "positions" not in obj:
                raise ValueError(f"batch mapping has no 'positions' key; keys: {sorted(obj)}")
            meta = obj.get("meta")
            return cls(torch.as_tensor(obj["positions"]), *(obj.get(v) for v in VIEWS),
                       meta=None if meta is None else torch.as_tensor(meta))
        if isinstance(obj, (tuple, list)) and len(obj) >= 5:
            return cls(torch.as_tensor(obj[4]), *obj[:4])
        raise TypeError(f"cannot read a batch from {type(obj).__name__}; expected Batch, a mapping, "
                        "or (img1, img2, img3, img4, positions, ...)")

    @classmethod
    def collate(cls, samples: Sequence[Mapping[str, Any]]) -> "Batch":
        """Stack per-sample mappings (each view (C, *S), positions a float or (P,)) into one Batch."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        views = {}
        for v in VIEWS:
            present = [s.get(v) is not None for s in samples]
            if any(present) and not all(present):
                raise ValueError(f"view {v!r} is present in some samples and missing in others")
            views[v] = torch.stack([torch.as_tensor(s[v]) for s in samples]) if all(present) else None
        positions = torch.stack([torch.as_tensor(s["positions"], dtype=torch.float32) for s in samples])
        has_meta = [s.get("meta") is not None for s in samples]
        if any(has_meta) and not all(has_meta):
            raise ValueError("'meta' is present in some samples and missing in others")
        meta = torch.stack([torch.as_tensor(s["meta"], dtype=torch.float32) for s in samples]) if all(has_meta) else None
        return cls(positions, **views, meta=meta)


def select_positions(positions: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """The (B,) meta-label: `positions` itself if (B,), its column `axis` if (B, P).

    Raises:
        ValueError: (B, P) positions without an axis, an axis out of range, or another rank.
    """
    if positions.dim() == 1:
        return positions
    if positions.dim() == 2:
        if axis is None:
            raise ValueError(f"positions have shape {tuple(positions.shape)}; set method.position_axis to pick a column")
        if not -positions.shape[1] <= axis < positions.shape[1]:
            raise ValueError(f"method.position_axis {axis} out of range for positions of shape {tuple(positions.shape)}")
        return positions[:, axis]
    raise ValueError(f"positions must be (B,) or (B, P), got shape {tuple(positions.shape)}")


class Method(nn.Module):
    """A pre-training objective around its network.

    Subclasses set `name`, `required_views`, `self.model` (with `pretrained_state_dict()` and `describe()`),
    `self.weights` (term name → weight), and implement `forward(batch) -> {term: scalar tensor}`.
    """

    name: str = ""
    required_views: Tuple[str, ...] = ()

    def __init__(self, net: NetConfig, cfg: MethodConfig):
        super().__init__()
        self.net_config, self.cfg = net, cfg
        self.weights: Dict[str, float] = {}
        #: passed to the contrastive losses as `process_group`: None (this process's batch) or "world" (keys
        #: from every rank; the trainer sets it under torchrun, see macl/parallel.py)
        self.process_group: Optional[str] = None
        #: term name → `EmbeddingProbe`, refreshed by every forward (read by `macl.diagnostics`)
        self.probes: Dict[str, EmbeddingProbe] = {}

    def probe_pair(self, term: str, z_a: torch.Tensor, z_b: torch.Tensor) -> None:
        """Record an image-level term over the 2B projections [z_a, z_b] (each (B, D)): 2B·world − 1 keys."""
        a, b = z_a.detach(), z_b.detach()
        keys = 2 * a.shape[0] * world_size_of(self.process_group) - 1
        self.probes[term] = EmbeddingProbe(lambda: torch.cat([a, b]).unsqueeze(0), keys, self.cfg.contrast_scale)

    def check_batch(self, batch: Batch) -> None:
        """Raise ValueError naming any required view that is missing or whose batch size differs."""
        for v in self.required_views:
            t = getattr(batch, v)
            if t is None:
                raise ValueError(f"method {self.name!r} needs batch.{v}, which is None")
            if t.shape[0] != batch.size:
                raise ValueError(f"batch.{v} has {t.shape[0]} samples but positions has {batch.size}")

    def positions(self, batch: Batch) -> torch.Tensor:
        """The (B,) positional meta-label of the batch (see `select_positions`)."""
        return select_positions(batch.positions, self.cfg.position_axis)

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L = Σ weight_t · term_t over the terms present."""
        return sum(self.weights[k] * v for k, v in terms.items())

    def pretrained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder (and decoder) tensors under the fine-tuning `UNet`'s key names."""
        return self.model.pretrained_state_dict()

    def describe(self) -> dict:
        """JSON description: method name, its config, and the network's architecture."""
        return {"method": self.name, "config": dataclasses.asdict(self.cfg), "network": self.model.describe()}


METHODS: Dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a `Method` subclass buildable by `build_method` under `name`."""
    def deco(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def build_method(net: NetConfig, cfg: MethodConfig, model: Optional[nn.Module] = None) -> Method:
    """Instantiate the method named `cfg.name`. Raises ValueError for an unknown name (the known ones listed).

    model: the method's network, already built (a `macl.nets.adapters` tapped model); for net.arch "monai:..."
    it is built from the config (`macl.nets.from_config.tapped_from_config`).
    """
    if cfg.name not in METHODS:
        raise ValueError(f"unknown method {cfg.name!r}; known: {sorted(METHODS)}")
    if model is None and getattr(net, "arch", "unet") != "unet":
        from ..nets.from_config import tapped_from_config
        model = tapped_from_config(net, cfg)
    return METHODS[cfg.name](net, cfg) if model is None else METHODS[cfg.name](net, cfg, model=model)
