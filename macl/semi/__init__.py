"""ARCO (semi-supervised segmentation with variance-reduced sampling) in one room.

Open `loop.py` first (the mean-teacher loop, `SemiConfig`, `train_semi`); `losses.py` holds the contrast and
memory bank, `sampling.py` the anchor / negative samplers, `augment.py` the strong view, `net.py` the network.
"""
from .loop import SemiConfig, SemiResult, train_semi

__all__ = ["SemiConfig", "SemiResult", "train_semi"]
