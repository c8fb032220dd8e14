"""The net section on the command line (``--net`` / ``--net-args``): a JSON-object argument type and the compact
form of a stored network description (the built-in U-Net's without the MONAI fields)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Mapping

#: NetConfig fields of a MONAI network and their defaults (dropped from a description when at the default)
ARCH_DEFAULTS = {"arch": "unet", "arch_args": None, "taps": None}


def json_object(text: str) -> dict:
    """argparse type: a JSON object ('{"filters": [32, 64]}'); one-line error otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def compact_net(net: Mapping[str, Any]) -> dict:
    """A network description without the MONAI fields when they hold their defaults (built-in U-Net runs)."""
    return {k: v for k, v in dict(net).items() if not (k in ARCH_DEFAULTS and v == ARCH_DEFAULTS[k])}


__all__ = ["json_object", "compact_net", "ARCH_DEFAULTS"]
