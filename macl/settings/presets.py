"""Named pre-training presets: ``faithful`` (the public MACL code) and ``robust`` (anti-collapse on).

A preset is a name for a few settings; every one of them can still be set on its own, and an explicit value
wins over the preset's. The settings a preset decides (``None`` in a config means "the preset's value"):

=====================  =============================  ==========================================
setting                ``faithful`` (public code)     ``robust``
=====================  =============================  ==========================================
``method.head_norm``   ``"none"``: GAP → Linear →     ``"batch"``: GAP → Linear → BatchNorm1d →
                       ReLU → Linear                  ReLU → Linear (both MACL image heads)
``data.reference_size`` ``"crop"``: the public code's  ``512``: the public code's magnitudes are
                       elastic α / σ in pixels, as    pixels of its 512² slices, rescaled to the
                       written, on any crop           crop: r = crop / 512, σ × r, α × r² (2D;
                                                      r^(1 + ndim/2) in general: the displacement
                                                      is then the same fraction of the crop)
=====================  =============================  ==========================================

Why (docs/macl_presets.md): at small sizes L_g of the public code collapses to its constant-embedding value
log(2B − 1)·τ/0.07 within a few dozen steps; BatchNorm after the first layer of the image heads (as the heads
of SimCLR v2 and MoCo v3) keeps the embeddings spread. The public code's elastic σ of 14–17 px was chosen for
512² slices; unscaled on a 64² crop it distorts a quarter of the image.

Both presets keep every other setting of the public code (views, λ, τ, the τ/0.07 rescale, the optimiser).
The geometry checks (`macl.settings.geometry`) apply to both.
"""
from __future__ import annotations

from typing import Any, Optional, Union

PRESETS = ("faithful", "robust")
#: the preset a config without one uses (chosen from the runs in docs/macl_presets.md)
DEFAULT_PRESET = "robust"
HEAD_NORMS = ("none", "batch")
PUBLIC_REFERENCE_SIZE = 512

_SETTINGS = {
    "faithful": {"head_norm": "none", "reference_size": "crop"},
    "robust": {"head_norm": "batch", "reference_size": PUBLIC_REFERENCE_SIZE},
}


def stored_config(data: Any) -> Any:
    """A stored config (nested dict with a "method" section, as `macl.settings.config.to_dict` writes into checkpoints and
    run folders) written before presets existed gets ``method.preset = "faithful"``: those runs used the public
    code's heads and augmentation scale. Other input is returned unchanged."""
    if isinstance(data, dict) and isinstance(data.get("method"), dict) and "preset" not in data["method"]:
        data = {**data, "method": {**data["method"], "preset": "faithful"}}
    return data


def check_preset(name: Any) -> str:
    """The preset name, or ValueError naming the bad value and the known ones."""
    if name not in PRESETS:
        raise ValueError(f"method.preset must be one of {PRESETS}, got {name!r}")
    return name


def preset_settings(name: str) -> dict:
    """The settings preset ``name`` decides: {"head_norm": ..., "reference_size": ...}. Raises ValueError."""
    return dict(_SETTINGS[check_preset(name)])


def resolve_head_norm(head_norm: Optional[str], preset: str) -> str:
    """``head_norm`` when set, else the preset's: "none" | "batch"."""
    value = preset_settings(preset)["head_norm"] if head_norm is None else head_norm
    if value not in HEAD_NORMS:
        raise ValueError(f"method.head_norm must be one of {HEAD_NORMS} or None (the preset's), got {value!r}")
    return value


def check_reference_size(value: Any) -> Union[None, str, int]:
    """Validate ``data.reference_size``: None (the preset's), "crop", or a positive integer. Raises ValueError."""
    if value is None or value == "crop":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"data.reference_size must be None (the preset's), 'crop' or a positive integer "
                         f"(512: the public code's slices), got {value!r}")
    return int(value)


def resolve_reference_size(value: Any, preset: str) -> Optional[int]:
    """The `SpatialViewConfig.reference_size` to use: None (no rescale: the magnitudes in crop pixels, as
    written) or the image size the magnitudes are given at (they are then scaled by crop / size)."""
    value = check_reference_size(value)
    if value is None:
        value = preset_settings(preset)["reference_size"]
    return None if value == "crop" else int(value)
