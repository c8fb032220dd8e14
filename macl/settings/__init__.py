"""Every setting of a run: the config dataclasses, their typed fields, MACL's presets, TOML, geometry checks.

Open `config.py` first (`PretrainConfig` and its sections); `fields.py` coerces and checks typed values,
`presets.py` resolves the "robust" / "paper" presets, `geometry.py` refuses crops that degenerate a loss term.
"""
from .config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig

__all__ = ["PretrainConfig", "NetConfig", "MethodConfig", "OptimConfig", "TrainConfig"]
