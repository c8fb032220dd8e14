"""Pre-training samples: crops of pre-processed volumes with positions, turned into MACL's views.

A batch is a dict::

    {"img1", "img2", "img3", "img4": (B, 1, *spatial) float32,   # see macl.data.views
     "positions": (B,) float32}                                 # (B, 3) with position_axes="all"

2D (``dims=2``): every slice of every volume along ``slice_axis`` is one sample per epoch,
padded / cropped in-plane to ``patch_size`` (random crop as the public code, or centred),
position ``(i + 1) / n``. 3D (``dims=3``): ``patches_per_volume`` random patches per volume and
epoch, position by :func:`macl.data.sampling.patch_position` (along the slice axis, or per axis).

Everything random is a function of (seed, epoch, sample indices), so a resumed run sees the
same batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from macl.settings.fields import coerce_fields
from macl.data import channels as chan
from macl.data.preprocess import Volume
from macl.data.sampling import crop_start, enumerate_slices, extract_slice, patch_position, window
from macl.data.views import ViewConfig, make_views
from macl.parallel import World


@dataclass
class PretrainDataConfig:
    """Settings of pre-training sampling.

    Attributes:
        dims: 2 (slices) or 3 (patches).
        patch_size: in-plane (X, Y) size for 2D, (X, Y, Z) for 3D.
        slice_axis: spatial axis slices are taken along / positions are measured on.
        crop: ``"random"`` or ``"centre"`` in-plane crop for 2D slices.
        channel: the image channel(s) the network sees: None (default) all, an int, or a list of ints.
        patches_per_volume: 3D samples per volume and epoch.
        position_axes: 3D ``"slice"`` ((B,) positions) or ``"all"`` ((B, 3)).
        views: the view settings (default: the public code's).
        seed: base seed of all randomness.
    """

    dims: int = 2
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    crop: str = "random"
    channel: int | list[int] | None = None
    patches_per_volume: int = 8
    position_axes: str = "slice"
    views: ViewConfig = field(default_factory=ViewConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self, "data.")
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if len(self.patch_size) != self.dims or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be {self.dims} positive sizes for dims={self.dims}, "
                             f"got {self.patch_size}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.crop not in ("random", "centre"):
            raise ValueError(f"crop must be 'random' or 'centre', got {self.crop!r}")
        if self.position_axes not in ("slice", "all"):
            raise ValueError(f"position_axes must be 'slice' or 'all', got {self.position_axes!r}")
        if self.patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {self.patches_per_volume}")


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style dataset of pre-training samples (see module docstring).

    ``ds[i]`` is one sample with ``img*`` (C, *spatial) and ``positions`` a 0-d tensor (or (3,)),
    so the default DataLoader collation yields the batch dict; :meth:`get_batch` builds a batch
    directly (views computed batch-wise, faster). Call :meth:`set_epoch` each epoch.
    """

    def __init__(self, volumes: Sequence[Volume], cfg: PretrainDataConfig) -> None:
        if not volumes:
            raise ValueError("PretrainDataset needs at least one volume")
        self.volumes = list(volumes)
        self.cfg = cfg
        self.epoch = 0
        if cfg.dims == 2:
            self.slices = enumerate_slices([v.shape for v in self.volumes], cfg.slice_axis)
        nch = self.volumes[0].image.shape[0]
        chan.check(cfg.channel, nch)

    def __len__(self) -> int:
        if self.cfg.dims == 2:
            return len(self.slices)
        return len(self.volumes) * self.cfg.patches_per_volume

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops / views are produced."""
        self.epoch = int(epoch)

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw crop of sample ``index`` and its position.

        Returns:
            (crop float32 (C', *patch_size), position float64 () or (3,)).
        """
        cfg = self.cfg
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        rng = _rng(cfg.seed, self.epoch, index)
        if cfg.dims == 2:
            ref = self.slices[index]
            vol = self.volumes[ref.volume]
            sl = extract_slice(vol.image, ref.index, cfg.slice_axis)
            start = crop_start(sl.shape[1:], cfg.patch_size, cfg.crop, rng)
            out, pos = window(sl, start, cfg.patch_size), np.float64(ref.position)
        else:
            vol = self.volumes[index % len(self.volumes)]
            start = crop_start(vol.shape, cfg.patch_size, "random", rng)
            out = window(vol.image, start, cfg.patch_size)
            per_axis = patch_position(start, cfg.patch_size, vol.shape)
            pos = per_axis if cfg.position_axes == "all" else np.float64(per_axis[cfg.slice_axis])
        out = chan.select(out, cfg.channel)
        return out.astype(np.float32, copy=False), pos

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of samples ``indices``: img1..img4 (B, C', *patch), positions (B,) / (B, 3)."""
        crops, positions = zip(*(self.crop(int(i)) for i in indices))
        x = torch.from_numpy(np.stack(crops))
        g = torch.Generator().manual_seed(int(_rng(self.cfg.seed, self.epoch, *indices).integers(2**62)))
        out = make_views(x, self.cfg.views, g)
        out["positions"] = torch.as_tensor(np.stack(positions), dtype=torch.float32)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}


def iterate_pretrain_batches(dataset: PretrainDataset, batch_size: int, epoch: int, *, shuffle: bool = True,
                             drop_last: bool = True, start_batch: int = 0,
                             world: Optional[World] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch, in a deterministic order given (seed, epoch).

    Args:
        dataset: the samples; its epoch is set to ``epoch``.
        batch_size: samples per batch.
        shuffle: random order (seeded) rather than sequential.
        drop_last: drop the last incomplete batch (contrastive losses want full batches).
        start_batch: skip the first batches (resuming mid-epoch).
        world: under torchrun, yield only this rank's contiguous share of every global batch of ``batch_size``
            samples (the sample order is the same on every rank and for every world size; each rank draws the
            random views of its own share).

    Raises:
        ValueError: ``batch_size`` < 1, or ``drop_last`` with fewer samples than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if drop_last and n < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} samples per epoch")
    dataset.set_epoch(epoch)
    order = _rng(dataset.cfg.seed, epoch, 7).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    if world is not None and not drop_last:
        raise ValueError("sharding batches over ranks needs drop_last=True (every rank takes equal shares)")
    lo, hi = (0, batch_size) if world is None else world.shard(batch_size)
    for b, s in enumerate(range(0, stop, batch_size)):
        if b >= start_batch:
            yield dataset.get_batch(order[s:s + batch_size][lo:hi].tolist())


def batches_per_epoch(dataset: PretrainDataset, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches :func:`iterate_pretrain_batches` yields per epoch."""
    n = len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)


def batches_from_step(dataset: PretrainDataset, batch_size: int, start_step: int = 0, *,
                      shuffle: bool = True, world: Optional[World] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, epoch after epoch, beginning at global batch ``start_step``.

    ``world``: under torchrun, this rank's share of each global batch (see :func:`iterate_pretrain_batches`).

    ``functools.partial(batches_from_step, dataset, batch_size)`` is the ``batches(start_step)``
    factory :func:`macl.train.pretrain` wants for exact resume.
    """
    per_epoch = batches_per_epoch(dataset, batch_size)
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(dataset)} samples per epoch")
    epoch, skip = divmod(int(start_step), per_epoch)
    while True:
        yield from iterate_pretrain_batches(dataset, batch_size, epoch, shuffle=shuffle, start_batch=skip,
                                            world=world)
        epoch, skip = epoch + 1, 0
