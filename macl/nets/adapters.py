"""MACL, PCL / SimCLR and GCL-style models around a user's encoder–decoder, read through taps (`taps.py`).

`TappedMACLModel` is `macl.nets.MACLModel` with E = "the user's network up to the bottleneck tap" and
D_k = "from there up to the decoder tap"; everything else is MACLModel's, tensor for tensor:

- auxiliary branch (full resolution, encoder only — the run stops when the bottleneck module returns):
    a1 = E(img1)            (B, C_b, *S/stride)        aux bottleneck (or the `er` tap) → L_ER
    p1 = g_p^a(a1)          (B, C_d, *S/stride)        PixelHead(C_b → C_d) → L_d
    z3 = g_g^a(E(img3))     (B, proj_dim)              ImageHead(C_b, C_d, proj_dim) → L_g
- dominant branch (input ↓r: bilinear / trilinear, align_corners=True; the run stops at the decoder tap):
    b2 = E(↓r img2)         (B, C_b, *S/(r·stride))    → L_ER
    p2 = D_k(b2, skips)     (B, C_d, *S/stride)        the decoder tap itself, aligned with p1 → L_d
    z4 = g_g^d(D_k(E(↓r img4)))  (B, proj_dim)         ImageHead(C_d, C_d, proj_dim) (or on b4: "encoder")
  r (per axis) = decoder tap size / bottleneck size, read from the tapped shapes (4 for two ×2 levels); it must
  equal 1/method.dominant_scale on every axis of an isotropic network (MACL: k = 2 levels, ×0.25).

`TappedEncoderProjector` (PCL, SimCLR: the bottleneck tap only) and `TappedGCLModel` (GCL-style: image head on
the bottleneck, pixel head on the decoder tap at full resolution) follow `EncoderProjector` / `GCLModel`.
Heads get the package's He initialisation; the user's network keeps its own.

`pretrained_state_dict()` gives the user's network's tensors that pre-training trains, under the network's
own key names: every state-dict entry (aliases included, e.g. DynUNet's ``skip_layers.*``) of a module that
runs before the pass stops. `missing_keys` are the rest (later decoder levels, the output head).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..settings.config import MethodConfig
from ..settings.geometry import GeometryError, require_tapped_geometry
from .heads import ImageHead, PixelHead
from .macl_model import MACLOutputs, resize
from .taps import TapError, Taps, TapSet, infer_dims_channels
from .unet import he_init

PROBE_SIDES = (64, 128, 256, 512)


def _owner_ran(key: str, ran: set) -> bool:
    return key.rpartition(".")[0] in ran


class TappedBase(nn.Module):
    """The user's network `net` (registered as ``self.net``) with a `TapSet`; shapes from a meta probe."""

    kind = "encoder-decoder"

    def __init__(self, net: nn.Module, taps: Union[Taps, Mapping], dims: Optional[int] = None,
                 in_channels: Optional[int] = None, probe_size: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TapError(f"expected an nn.Module encoder–decoder, got {type(net).__name__}")
        self.net = net
        self.tapset = TapSet(net, taps)
        if dims is None or in_channels is None:
            d, c = infer_dims_channels(net)
            dims, in_channels = dims or d, in_channels or c
        self.dims, self.in_channels = int(dims), int(in_channels)
        self.stop = "decoder" if self.tapset.taps.decoder is not None else "bottleneck"
        if self.kind == "encoder-decoder" and self.stop != "decoder":
            raise TapError(f"{type(self).__name__} needs a 'decoder' tap on {type(net).__name__}")
        self.shapes, self.ran = self._first_probe(probe_size)
        self.pretrained_keys = sorted(k for k in net.state_dict() if _owner_ran(k, self.ran))
        self.missing_keys = sorted(k for k in net.state_dict() if k not in set(self.pretrained_keys))
        if not self.pretrained_keys:
            raise TapError(f"no tensor of {type(net).__name__} runs before its {self.stop!r} tap")
        self._checked: Dict[Tuple[int, ...], Tuple[int, ...]] = {}

    @property
    def net_name(self) -> str:
        return type(self.net).__name__

    def _first_probe(self, probe_size) -> Tuple[Dict[str, Tuple[int, ...]], set]:
        sizes = [tuple(probe_size)] if probe_size is not None else [(s,) * self.dims for s in PROBE_SIDES]
        last = None
        for size in sizes:
            try:
                shapes, order, ran = self.tapset.probe((2, self.in_channels) + tuple(size), self.stop)
            except TapError as e:
                last = e
                continue
            self.check_encoder_decoder(size, shapes, order)
            self.probe_input = tuple(size)
            return shapes, ran
        raise last if last is not None else TapError("no probe size")

    def check_encoder_decoder(self, size, shapes, order) -> None:
        """TapError (one line, modules named) unless the bottleneck is coarser than the input and the decoder tap
        is finer than the bottleneck and runs after it."""
        b = shapes["bottleneck"][2:]
        paths = self.tapset.paths
        if len(b) != self.dims or all(x >= s for x, s in zip(b, size)):
            raise TapError(f"{self.net_name} is not an encoder–decoder at its taps: the bottleneck "
                           f"{paths['bottleneck']!r} gives {tuple(shapes['bottleneck'])} for a "
                           f"{'x'.join(map(str, size))} input (no down-sampling)")
        if paths["er"] != paths["bottleneck"] and order.index("er") > order.index("bottleneck"):
            raise TapError(f"tap 'er' ({paths['er']!r}) must run before the bottleneck ({paths['bottleneck']!r})")
        if "decoder" in shapes:
            q = shapes["decoder"][2:]
            if order.index("decoder") < order.index("bottleneck"):
                raise TapError(f"{self.net_name} is not an encoder–decoder at its taps: the decoder tap "
                               f"{paths['decoder']!r} runs before the bottleneck {paths['bottleneck']!r}")
            if len(q) != len(b) or any(x < y or x % y for x, y in zip(q, b)) or q == b:
                raise TapError(f"{self.net_name} is not an encoder–decoder at its taps: the decoder tap "
                               f"{paths['decoder']!r} gives {tuple(shapes['decoder'])}, not finer than the bottleneck "
                               f"{paths['bottleneck']!r} {tuple(shapes['bottleneck'])}")

    def ratio(self) -> Tuple[int, ...]:
        """r per axis: decoder tap size / bottleneck size (from the probe)."""
        b, q = self.shapes["bottleneck"][2:], self.shapes["decoder"][2:]
        return tuple(x // y for x, y in zip(q, b))

    def channels(self) -> Tuple[int, Optional[int]]:
        """(C_b, C_d): bottleneck and decoder-tap channels (C_d None without a decoder tap)."""
        return self.shapes["bottleneck"][1], self.shapes["decoder"][1] if "decoder" in self.shapes else None

    def encode(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The encoder-only pass: {"bottleneck", "er"} features of x."""
        return self.tapset.run(x, "bottleneck")

    def pretrained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained tensors of the user's network under its own key names (module docstring)."""
        sd = self.net.state_dict()
        return {k: sd[k].detach().clone() for k in self.pretrained_keys}

    def describe(self) -> dict:
        return {"model": type(self).__name__, "arch": self.net_name, "taps": self.tapset.taps.to_dict(),
                "dims": self.dims, "in_channels": self.in_channels, "pretrained_keys": self.pretrained_keys,
                "missing_keys": self.missing_keys, "state_prefix": "net."}


class TappedMACLModel(TappedBase):
    """MACL's asymmetric model on a tapped network. forward(img1, img2, img3=None, img4=None) → `MACLOutputs`."""

    def __init__(self, net: nn.Module, taps, cfg: Optional[MethodConfig] = None, pixel_norm: str = "batch",
                 dims: Optional[int] = None, in_channels: Optional[int] = None, probe_size=None):
        super().__init__(net, taps, dims, in_channels, probe_size)
        cfg = cfg or MethodConfig()
        self.cfg = cfg
        r = self.ratio()
        if len(set(r)) == 1 and abs(r[0] * cfg.dominant_scale - 1.0) > 1e-9:
            raise TapError(f"the decoder tap {self.tapset.paths['decoder']!r} of {self.net_name} is {r[0]}x finer than "
                           f"the bottleneck, so MACL's dominant scale must be 1/{r[0]}; method.dominant_scale is "
                           f"{cfg.dominant_scale!r}")
        cb, cd = self.channels()
        self.proj_dim = int(cfg.proj_dim or 128)
        self.dominant_image_source = cfg.dominant_image_source
        self.aux_pixel_head = PixelHead(self.dims, cb, cd, pixel_norm)
        self.aux_image_head = ImageHead(cb, cd, self.proj_dim, cfg.image_head_norm)
        dom_in = cd if cfg.dominant_image_source == "decoder" else cb
        self.dom_image_head = ImageHead(dom_in, cd, self.proj_dim, cfg.image_head_norm)
        for head in (self.aux_pixel_head, self.aux_image_head, self.dom_image_head):
            head.apply(he_init)

    def check_geometry(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        """The dominant input size S/r for a crop S, after the degenerate-bottleneck checks from the tapped shapes
        (`macl.settings.geometry.require_tapped_geometry`, GeometryError naming module and sizes); cached."""
        spatial = tuple(int(s) for s in spatial)
        if spatial in self._checked:
            return self._checked[spatial]
        if len(spatial) != self.dims:
            raise ValueError(f"MACL input must have {self.dims} spatial axes for {self.net_name}, got {spatial}")
        try:
            shapes, _, _ = self.tapset.probe((2, self.in_channels) + spatial, "bottleneck")
        except TapError as e:
            raise GeometryError(str(e)) from None
        b, r = shapes["bottleneck"][2:], self.ratio()
        require_tapped_geometry(self.net_name, spatial, b, r, self.cfg, self.tapset.paths["bottleneck"])
        small = tuple(s // x for s, x in zip(spatial, r))
        try:
            dom, _, _ = self.tapset.probe((2, self.in_channels) + small, "decoder")
        except TapError as e:
            raise GeometryError(f"MACL dominant view {'x'.join(map(str, small))} of a {'x'.join(map(str, spatial))} "
                                f"crop: {e}") from None
        if dom["decoder"][2:] != b:
            raise GeometryError(f"MACL on {self.net_name} at patch {'x'.join(map(str, spatial))}: the dominant pixel "
                                f"map ({self.tapset.paths['decoder']!r}, {dom['decoder'][2:]}) is not aligned with the "
                                f"auxiliary bottleneck ({self.tapset.paths['bottleneck']!r}, {b})")
        self._checked[spatial] = small
        return small

    def dominant(self, x: torch.Tensor, small: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The dominant pass on ↓r x: {"bottleneck", "er", "decoder"}."""
        return self.tapset.run(resize(x, small), "decoder")

    def forward(self, img1: torch.Tensor, img2: torch.Tensor, img3: Optional[torch.Tensor] = None,
                img4: Optional[torch.Tensor] = None) -> MACLOutputs:
        small = self.check_geometry(img1.shape[2:])
        aux = self.encode(img1)
        p1 = self.aux_pixel_head(aux["bottleneck"])
        dom = self.dominant(img2, small)
        z3 = z4 = None
        if img3 is not None:
            z3 = self.aux_image_head(self.encode(img3)["bottleneck"])
        if img4 is not None:
            d4 = self.dominant(img4, small)
            z4 = self.dom_image_head(d4["decoder"] if self.dominant_image_source == "decoder" else d4["bottleneck"])
        return MACLOutputs(aux["er"], p1, dom["er"], dom["decoder"], z3, z4)

    def describe(self) -> dict:
        return {**super().describe(), "ratio": list(self.ratio()), "proj_dim": self.proj_dim,
                "dominant_image_source": self.dominant_image_source}


class TappedEncoderProjector(TappedBase):
    """PCL / SimCLR on a tapped network: bottleneck tap + ImageHead(C_b, hidden, proj). (B, C, *S) → (B, proj)."""

    kind = "encoder"

    def __init__(self, net: nn.Module, taps, proj_dim: Optional[int] = None, hidden: Optional[int] = None,
                 dims: Optional[int] = None, in_channels: Optional[int] = None, probe_size=None):
        taps = Taps.from_any(taps)
        super().__init__(net, Taps(taps.bottleneck, None, taps.er), dims, in_channels, probe_size)
        cb = self.channels()[0]
        self.proj_dim = int(proj_dim or cb)
        self.image_head = ImageHead(cb, int(hidden or cb), self.proj_dim)
        self.image_head.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encode(x)["bottleneck"])


class TappedGCLModel(TappedBase):
    """GCL-style on a tapped network: image(x) on the bottleneck tap, pixel(x) on the decoder tap (full resolution)."""

    def __init__(self, net: nn.Module, taps, proj_dim: int = 128, pixel_dim: Optional[int] = None,
                 pixel_norm: str = "batch", dims: Optional[int] = None, in_channels: Optional[int] = None,
                 probe_size=None):
        super().__init__(net, taps, dims, in_channels, probe_size)
        cb, cd = self.channels()
        self.proj_dim, self.pixel_dim = int(proj_dim), int(pixel_dim or cd)
        self.image_head = ImageHead(cb, cd, self.proj_dim)
        self.pixel_head = PixelHead(self.dims, cd, self.pixel_dim, pixel_norm)
        self.image_head.apply(he_init)
        self.pixel_head.apply(he_init)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encode(x)["bottleneck"])

    def pixel(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_head(self.tapset.run(x, "decoder")["decoder"])


def tapped_model(method: str, net: nn.Module, taps, cfg: MethodConfig, pixel_norm: str = "batch",
                 dims: Optional[int] = None, in_channels: Optional[int] = None, probe_size=None) -> TappedBase:
    """The tapped model a method needs: macl → TappedMACLModel, pcl / simclr → TappedEncoderProjector (the
    bottleneck tap only), gcl → TappedGCLModel. ValueError for another method (named)."""
    kw = dict(dims=dims, in_channels=in_channels, probe_size=probe_size)
    if method == "macl":
        return TappedMACLModel(net, taps, cfg, pixel_norm, **kw)
    if method in ("pcl", "simclr"):
        return TappedEncoderProjector(net, taps, proj_dim=cfg.proj_dim, **kw)
    if method == "gcl":
        return TappedGCLModel(net, taps, proj_dim=cfg.proj_dim or 128, pixel_dim=cfg.pixel_dim, pixel_norm=pixel_norm,
                              **kw)
    raise ValueError(f"method {method!r} cannot pre-train a tapped network; known: macl, pcl, simclr, gcl")


__all__ = ["TappedBase", "TappedMACLModel", "TappedEncoderProjector", "TappedGCLModel", "tapped_model"]
