"""Pre-training views against fine-tuning input: elastic displacement as a fraction of the crop, and the
intensity scale of the ``zscore`` views (macl.data.views) against what fine-tuning feeds the network."""
import math

import numpy as np
import pytest
import torch

from macl.data import PhantomConfig, PreprocessConfig, load_volumes, open_dataset, write_phantom_dataset
from macl.data.pretrain import PretrainDataConfig, PretrainDataset
from macl.data.segsampling import SegBatchSampler, SegSamplingConfig
from macl.data.views import IntensityViewConfig, SpatialViewConfig, ViewConfig, make_views, sample_spatial_params


def _rms_fraction(side: int, reference: int, n: int = 6, seed: int = 0) -> float:
    """RMS elastic displacement (pixels) over the crop, divided by the crop side."""
    cfg = SpatialViewConfig(p_deform=1.0, elastic_alpha=(200.0, 200.0), elastic_sigma=(15.0, 15.0),
                            reference_size=reference, flip_prob=0.0)
    p = sample_spatial_params(cfg, n, (side, side), torch.Generator().manual_seed(seed))
    return float(p.displacement.double().pow(2).sum(1).mean().sqrt()) / side


def test_scaled_elastic_displacement_is_the_same_fraction_of_the_crop():
    at_reference = _rms_fraction(512, 512, n=2)
    for side in (64, 128):
        frac = _rms_fraction(side, 512)
        assert frac == pytest.approx(at_reference, rel=0.15), (side, frac, at_reference)
    # alpha x r alone (the old scaling) keeps the displacement in pixels: 512/64 = 8 times the fraction at 64
    old = _rms_fraction(64, 512) * (512 / 64)
    assert old > 5 * at_reference
    # unscaled ("crop"), the public code's pixels on a 64 crop: far larger still
    assert _rms_fraction(64, None) > 5 * at_reference


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = write_phantom_dataset(tmp_path_factory.mktemp("ph"), PhantomConfig(n_subjects=1, shape=(32, 32, 8), seed=3))
    return load_volumes(open_dataset(root), PreprocessConfig())[0]


def _pretrain_crop(volume, views: str):
    cfg = PretrainDataConfig(dims=2, patch_size=(32, 32), views=ViewConfig.from_preset(views), seed=0)
    ds = PretrainDataset([volume], cfg)
    ds.set_epoch(0)
    crop = torch.from_numpy(np.asarray(ds.crop(3)[0], dtype=np.float32))[None]
    return crop, cfg.views


def test_zscore_views_share_the_fine_tuning_input_scale(volume):
    """The same slice as pre-training crop and as fine-tuning input: identical values; the zscore views are an
    affine map of them with a factor in the configured range (no per-crop min-max, no 8-bit, no clipping)."""
    crop, views = _pretrain_crop(volume, "zscore")
    # fine-tuning input: the same pre-processed volume, full-slice crops (32 x 32 slices), no mirroring: every
    # input is a slice of the volume as stored, and so is the pre-training crop (slice 3)
    vol = torch.from_numpy(np.asarray(volume.image, dtype=np.float32))  # (C, X, Y, Z)
    torch.testing.assert_close(crop[0], vol[..., 3], rtol=0, atol=0)
    sampler = SegBatchSampler([volume], SegSamplingConfig(2, (32, 32), foreground_prob=0.0, mirror=False))
    for x in sampler.batch(0, 6)[0]:
        assert min(float((x - vol[..., z]).abs().max()) for z in range(vol.shape[-1])) == 0.0
    # with the intensity augmentation off, img1 IS the fine-tuning scale (z-scored volume values)
    plain = ViewConfig("zscore", IntensityViewConfig(enabled=False), minmax=False)
    v = make_views(crop, plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v["img1"], crop, rtol=0, atol=0)
    z = np.asarray(volume.image)
    assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2  # what fine-tuning sees: z-scored
    # with it on (blur off to compare voxel by voxel): img = a x + b, a = brightness x contrast in [0.56, 1.56]
    unblurred = ViewConfig.from_preset("zscore")
    unblurred.intensity.blur_kernel = 1
    for seed in range(5):
        img = make_views(crop, unblurred, torch.Generator().manual_seed(seed))["img1"][0, 0].double().ravel()
        x = crop[0, 0].double().ravel()
        a, b = np.polyfit(x.numpy(), img.numpy(), 1)
        assert 0.7 * 0.8 - 1e-6 <= a <= 1.3 * 1.2 + 1e-6
        np.testing.assert_allclose(img.numpy(), a * x.numpy() + b, atol=1e-4)


def test_code_views_do_not_share_it(volume):
    """The public code's views: every view of every crop spans exactly [0, 1] (per-crop min-max) in 256 levels,
    whatever the volume's z-scored range; the fine-tuning input keeps that range (the doc's difference)."""
    crop, views = _pretrain_crop(volume, "code")
    v = make_views(crop.repeat(4, 1, 1, 1), views, torch.Generator().manual_seed(1))
    for img in (v["img1"], v["img2"]):
        flat = img.reshape(4, -1)
        live = flat.max(1).values > 0  # a brightness factor near 0 may blank a view (module docstring)
        assert torch.allclose(flat[live].min(1).values, torch.zeros(int(live.sum())), atol=1e-6)
        assert torch.allclose(flat[live].max(1).values, torch.ones(int(live.sum())), atol=1e-6)
    assert float(crop.min()) < -0.5 and float(crop.max()) > 1.5  # the fine-tuning scale is not [0, 1]
    assert math.isclose(float(views.intensity.blur_prob), 1.0)  # always blurred
