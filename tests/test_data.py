"""macl.data: readers on generated files, bad data, pre-processing, positions, views, the phantom."""
import json
import logging
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from macl.data import (DataError, PhantomConfig, PreprocessConfig, PretrainDataConfig, PretrainDataset, Volume,
                       ViewConfig, batches_from_step, enumerate_slices, generate_subject, iterate_pretrain_batches,
                       load_case, load_volumes, make_views, open_dataset, patch_position, read_datalist, read_msd,
                       read_nifti_folder, slice_positions, write_phantom_dataset)
from macl.data.preprocess import VolumeCache, reorient
from macl.data.sampling import window
from macl.data.views import (IntensityViewConfig, SpatialViewConfig, apply_spatial, minmax, sample_spatial_params)

SHAPE = (24, 24, 16)


def _save(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def _vol(rng, shape=SHAPE):
    return rng.normal(100, 20, shape).astype(np.float32)


def _lab(rng, shape=SHAPE, k=3):
    return rng.integers(0, k, shape).astype(np.uint8)


# ------------------------------------------------------------------------------------------ readers
def test_nifti_folder_reader(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c4 = _vol(rng), _vol(rng), rng.normal(size=SHAPE + (2,)).astype(np.float32)
    la = _lab(rng)
    _save(tmp_path / "a.nii.gz", a)
    _save(tmp_path / "b.nii", b)
    _save(tmp_path / "c.nii.gz", c4)
    _save(tmp_path / "labels" / "a.nii.gz", la)
    (tmp_path / "._a.nii.gz").write_bytes(b"macOS resource fork")  # must be ignored
    (tmp_path / "notes.txt").write_text("ignored")
    index = open_dataset(tmp_path)
    assert index.source == "folder"
    assert [cs.case_id for cs in index.cases] == ["a", "b", "c"]
    assert index.cases[0].label == tmp_path / "labels" / "a.nii.gz"
    assert index.cases[1].label is None and len(index.labelled()) == 1
    ra, rb, rc = (load_case(cs) for cs in index.cases)
    np.testing.assert_array_equal(ra.image[0], a)
    np.testing.assert_array_equal(ra.label, la)
    np.testing.assert_array_equal(rb.image[0], b)
    assert rc.image.shape == (2,) + SHAPE
    np.testing.assert_array_equal(rc.image, np.moveaxis(c4, 3, 0))


def test_msd_nnunet_channel_files(tmp_path):
    rng = np.random.default_rng(1)
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    arrays = {}
    for cid in ("case_1", "case_2"):
        arrays[cid] = [_vol(rng), _vol(rng)]
        for ch in range(2):
            _save(tmp_path / "imagesTr" / f"{cid}_{ch:04d}.nii.gz", arrays[cid][ch])
        _save(tmp_path / "labelsTr" / f"{cid}.nii.gz", _lab(rng))
    test_img = _vol(rng)
    for ch in range(2):
        _save(tmp_path / "imagesTs" / f"case_9_{ch:04d}.nii.gz", test_img)
    index = open_dataset(tmp_path)
    assert index.source == "msd" and index.labels == {0: "background", 1: "a", 2: "b"}
    assert index.channel_names == ["T1", "T2"]
    assert [cs.case_id for cs in index.cases] == ["case_1", "case_2", "case_9"]
    assert index.by_id("case_9").label is None
    raw = load_case(index.by_id("case_2"), allowed_labels=index.allowed_label_values)
    np.testing.assert_array_equal(raw.image, np.stack(arrays["case_2"]))
    assert len(read_msd(tmp_path, include_unlabelled=False).cases) == 2


def test_msd_decathlon_4d_and_nnunet_v1_listing(tmp_path):
    rng = np.random.default_rng(2)
    four_d = rng.normal(size=SHAPE + (3,)).astype(np.float32)
    lab = _lab(rng, k=4)
    _save(tmp_path / "msd" / "imagesTr" / "BRATS_001.nii.gz", four_d)
    _save(tmp_path / "msd" / "labelsTr" / "BRATS_001.nii.gz", lab)
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"},
            "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps(meta))
    index = open_dataset(tmp_path / "msd" / "dataset.json")  # the json itself also works
    raw = load_case(index.cases[0], allowed_labels=index.allowed_label_values)
    assert raw.image.shape == (3,) + SHAPE
    np.testing.assert_array_equal(raw.image, np.moveaxis(four_d, 3, 0))
    np.testing.assert_array_equal(raw.label, lab)
    # nnU-Net v1: dataset.json lists the case without channel suffix; the files carry _0000, _0001
    v1 = tmp_path / "v1"
    chans = [_vol(rng), _vol(rng)]
    for ch in range(2):
        _save(v1 / "imagesTr" / f"la_003_{ch:04d}.nii.gz", chans[ch])
    _save(v1 / "labelsTr" / "la_003.nii.gz", _lab(rng, k=2))
    meta["training"] = [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}]
    (v1 / "dataset.json").write_text(json.dumps(meta))
    raw = load_case(read_msd(v1).cases[0])
    np.testing.assert_array_equal(raw.image, np.stack(chans))


def test_datalist_reader(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {p: _vol(rng) for p in ("p1/image.nii.gz", "p2/image.nii.gz", "p3/t1.nii.gz", "p3/t2.nii.gz")}
    for p, a in imgs.items():
        _save(tmp_path / p, a)
    _save(tmp_path / "p1/seg.nii.gz", _lab(rng))
    dl = {"training": [{"image": "p1/image.nii.gz", "label": "p1/seg.nii.gz"}, {"image": "p2/image.nii.gz"},
                       {"image": ["p3/t1.nii.gz", "p3/t2.nii.gz"]}],
          "validation": ["p2/image.nii.gz"]}
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    index = open_dataset(tmp_path / "datalist.json")
    assert index.source == "datalist"
    ids = [cs.case_id for cs in index.cases]
    assert ids == ["p1_image", "p2_image", "t1"]  # same stems get their folder, unique stems stay
    multi = load_case(index.by_id("t1"))
    np.testing.assert_array_equal(multi.image, np.stack([imgs["p3/t1.nii.gz"], imgs["p3/t2.nii.gz"]]))
    assert index.by_id("p1_image").label is not None
    assert [cs.case_id for cs in read_datalist(tmp_path / "datalist.json", key="validation").cases] == ["image"]
    with pytest.raises(DataError, match="no 'test' list"):
        read_datalist(tmp_path / "datalist.json", key="test")


# ------------------------------------------------------------------------------------------ bad data
def test_truncated_gzip_names_the_file(tmp_path):
    good = _save(tmp_path / "a.nii.gz", _vol(np.random.default_rng(0)))
    blob = good.read_bytes()
    bad = tmp_path / "b.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    index = read_nifti_folder(tmp_path)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_volumes(index)
    assert str(bad) in str(err.value)
    (tmp_path / "c.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(DataError, match="c.nii.gz: cannot read NIfTI"):
        load_case(read_nifti_folder(tmp_path).by_id("c"))


def test_skip_bad_skips_with_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    _save(tmp_path / "a.nii.gz", _vol(rng))
    _save(tmp_path / "c.nii.gz", _vol(rng))
    (tmp_path / "b.nii.gz").write_bytes(b"\x1f\x8b garbage")
    index = read_nifti_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        vols = load_volumes(index, skip_bad=True)
    assert [v.case_id for v in vols] == ["a", "c"]
    assert any("b.nii.gz" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for p in ("a.nii.gz", "c.nii.gz"):
        (tmp_path / p).write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no readable volumes \(3 of 3 skipped\)"):
        load_volumes(read_nifti_folder(tmp_path), skip_bad=True)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no volumes here")
    with pytest.raises(DataError, match="no NIfTI volumes found") as err:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="imagesTr: no NIfTI volumes"):
        open_dataset(tmp_path)


def test_shape_mismatch_and_label_values(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}}))
    _save(tmp_path / "imagesTr" / "x_0000.nii.gz", _vol(rng))
    _save(tmp_path / "labelsTr" / "x.nii.gz", np.zeros((24, 24, 15), np.uint8))
    index = open_dataset(tmp_path)
    with pytest.raises(DataError, match=r"label shape \(24, 24, 15\) does not match image shape \(24, 24, 16\)") as e:
        load_volumes(index)
    assert "labelsTr/x.nii.gz" in str(e.value)
    lab = np.zeros(SHAPE, np.uint8)
    lab[3, 3, 3] = 7
    _save(tmp_path / "labelsTr" / "x.nii.gz", lab)
    with pytest.raises(DataError, match=r"x.nii.gz: label values \[7\] are not in the data set's labels \[0, 1\]"):
        load_volumes(open_dataset(tmp_path))


def test_2d_image_where_3d_required(tmp_path):
    p = _save(tmp_path / "flat.nii.gz", np.zeros((24, 24), np.float32))
    with pytest.raises(DataError, match=r"flat.nii.gz: 2D image of shape \(24, 24\); a 3D volume is required"):
        load_volumes(read_nifti_folder(tmp_path))
    vols = load_volumes(read_nifti_folder(tmp_path), PreprocessConfig(require_3d=False, zscore=False))
    assert vols[0].image.shape == (1, 24, 24, 1) and p.exists()


# ------------------------------------------------------------------------------------- pre-processing
def test_zscore_and_ct_window(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 600, SHAPE).astype(np.float32)
    _save(tmp_path / "ct.nii.gz", hu)
    v = load_volumes(read_nifti_folder(tmp_path), PreprocessConfig(ct_window=(-200, 300)))[0]
    ref = np.clip(hu, -200, 300)
    np.testing.assert_allclose(v.image[0], (ref - ref.mean()) / ref.std(), rtol=1e-4, atol=1e-4)
    assert abs(v.image.mean()) < 1e-5 and abs(v.image.std() - 1) < 1e-5


def test_reorientation_matches_nibabel_canonical(tmp_path):
    rng = np.random.default_rng(0)
    data = _vol(rng)
    lab = _lab(rng)
    aff = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 1.0, 0, -3], [0, 0, 0, 1]])  # permuted, flipped
    _save(tmp_path / "v.nii.gz", data, aff)
    _save(tmp_path / "labels" / "v.nii.gz", lab, aff)
    v = load_volumes(read_nifti_folder(tmp_path), PreprocessConfig(zscore=False))[0]
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    np.testing.assert_array_equal(v.image[0], np.asarray(canon.dataobj))
    np.testing.assert_allclose(v.affine, canon.affine)
    np.testing.assert_array_equal(v.label, np.asarray(nib.as_closest_canonical(nib.Nifti1Image(lab, aff)).dataobj))
    assert v.spacing == pytest.approx((2.0, 1.5, 1.0))  # world x, y, z came from voxel axes 2, 0, 1
    img, _, aff2 = reorient(v.image, None, v.affine, "RAS")
    assert img is v.image and np.array_equal(aff2, v.affine)


def test_resampling_keeps_world_coordinates(tmp_path):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = [5, -3, 7]
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    world = aff[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + aff[:3, 3:]
    ramp = (0.7 * world[0] - 0.2 * world[1] + 0.1 * world[2]).reshape(SHAPE).astype(np.float32)
    _save(tmp_path / "r.nii.gz", ramp, aff)
    v = load_volumes(read_nifti_folder(tmp_path), PreprocessConfig(spacing=(2.0, 2.0, 2.0), zscore=False))[0]
    assert v.shape == (12, 12, 16) and v.spacing == pytest.approx((2.0, 2.0, 2.0))
    i, j, k = np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij")
    w = v.affine[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + v.affine[:3, 3:]
    expected = (0.7 * w[0] - 0.2 * w[1] + 0.1 * w[2]).reshape(v.shape)
    np.testing.assert_allclose(v.image[0], expected, atol=1e-4)  # a linear ramp survives trilinear exactly


def test_cache_hit_and_invalidation(tmp_path, caplog):
    rng = np.random.default_rng(0)
    _save(tmp_path / "d" / "a.nii.gz", _vol(rng))
    index = read_nifti_folder(tmp_path / "d")
    cfg = PreprocessConfig(cache_dir=str(tmp_path / "cache"))
    first = load_volumes(index, cfg)[0]
    second = load_volumes(index, cfg)[0]
    assert isinstance(second.image, np.memmap) and not isinstance(first.image, np.memmap)
    np.testing.assert_array_equal(first.image, second.image)
    assert VolumeCache.key(index.cases[0], cfg, None) != VolumeCache.key(
        index.cases[0], PreprocessConfig(cache_dir=cfg.cache_dir, ct_window=(0, 1)), None)
    entry = next((tmp_path / "cache").glob("a-*"))
    (entry / "image.npy").write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        third = load_volumes(index, cfg)[0]
    np.testing.assert_array_equal(third.image, first.image)
    assert any("damaged cache entry" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- positions
def test_slice_positions_hand_computed():
    np.testing.assert_allclose(slice_positions(4), [0.25, 0.5, 0.75, 1.0])
    refs = enumerate_slices([(5, 5, 4), (5, 5, 2), (3, 5, 5)], axis=2)
    assert [(r.volume, r.index, r.position) for r in refs] == [
        (0, 0, 0.25), (0, 1, 0.5), (0, 2, 0.75), (0, 3, 1.0), (1, 0, 0.5), (1, 1, 1.0),
        (2, 0, 0.2), (2, 1, 0.4), (2, 2, 0.6), (2, 3, 0.8), (2, 4, 1.0)]
    assert [r.position for r in enumerate_slices([(3, 5, 5)], axis=0)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_patch_position_hand_computed():
    assert patch_position(0, 8, 16) == pytest.approx(0.5)
    assert patch_position(8, 8, 16) == pytest.approx(1.0)
    assert patch_position(3, 1, 10) == pytest.approx(0.4)  # a one-voxel patch is a slice: (i+1)/n
    assert patch_position(-2, 20, 16) == pytest.approx(1.0)  # padded patch
    np.testing.assert_allclose(patch_position([0, 4, 2], [4, 4, 4], [8, 8, 16]), [0.5, 1.0, 0.375])


def _coded_volume(shape, channels=1):
    """Voxel value = 1000 x + 10 y... encodes the coordinates: value // 1 recovers them."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    code = (i * 10000 + j * 100 + k).astype(np.float32)
    img = np.stack([code + 1e6 * c for c in range(channels)])
    return Volume("coded", img, None, (1.0, 1.0, 1.0), np.eye(4))


def test_2d_dataset_positions_match_the_slice_taken():
    vols = [_coded_volume((12, 10, 6)), _coded_volume((12, 10, 3))]
    ds = PretrainDataset(vols, PretrainDataConfig(dims=2, patch_size=(8, 8)))
    assert len(ds) == 9
    expected = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1 / 3, 2 / 3, 1.0]
    for i in range(len(ds)):
        crop, pos = ds.crop(i)
        z = int(crop[0].flat[0]) % 100
        n = vols[0].shape[2] if i < 6 else 3
        assert pos == pytest.approx((z + 1) / n) == pytest.approx(expected[i])
        assert crop.shape == (1, 8, 8)


def test_3d_dataset_positions_match_the_patch_taken():
    vol = _coded_volume((20, 18, 16), channels=2)
    for axes in ("slice", "all"):
        ds = PretrainDataset([vol], PretrainDataConfig(dims=3, patch_size=(8, 6, 4), patches_per_volume=12,
                                                       position_axes=axes, channel=1))
        for i in range(len(ds)):
            crop, pos = ds.crop(i)
            code = int(crop[0, 0, 0, 0] - 1e6)  # channel 1 was selected
            start = np.array([code // 10000, (code // 100) % 100, code % 100])
            expected = (start + np.array([8, 6, 4])) / np.array([20, 18, 16])
            np.testing.assert_allclose(pos, expected if axes == "all" else expected[2])


def test_pretrain_batches_deterministic_and_resumable():
    rng = np.random.default_rng(0)
    vol = Volume("v", rng.normal(size=(1, 16, 16, 10)).astype(np.float32), None, (1, 1, 1), np.eye(4))
    ds = PretrainDataset([vol, vol], PretrainDataConfig(dims=2, patch_size=(16, 16), seed=3))
    epoch0 = list(iterate_pretrain_batches(ds, 4, epoch=0))
    assert len(epoch0) == 5
    b = epoch0[0]
    assert set(b) == {"img1", "img2", "img3", "img4", "positions"}
    for k in ("img1", "img2", "img3", "img4"):
        assert b[k].shape == (4, 1, 16, 16) and b[k].dtype == torch.float32
    assert b["positions"].shape == (4,)
    again = list(iterate_pretrain_batches(ds, 4, epoch=0))
    assert all(torch.equal(x["img3"], y["img3"]) for x, y in zip(epoch0, again))
    other = next(iterate_pretrain_batches(ds, 4, epoch=1))
    assert not torch.equal(other["img1"], b["img1"])
    stream = batches_from_step(ds, 4, 0)
    full = [next(stream) for _ in range(8)]
    resumed = batches_from_step(ds, 4, 6)
    for expect in full[6:]:
        got = next(resumed)
        assert torch.equal(got["img4"], expect["img4"]) and torch.equal(got["positions"], expect["positions"])
    sample = ds[2]
    assert sample["img1"].shape == (1, 16, 16) and sample["positions"].shape == ()


# -------------------------------------------------------------------------------------------- views
def test_intensity_views_stay_voxel_aligned():
    x = torch.zeros(24, 1, 32, 32)
    x[:, :, 8:20, 12:26] = 1.0  # a bright block at known voxels
    x += 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[9:19, 13:25] = True  # block eroded by the blur radius (k=3)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[7:21, 11:27] = False  # complement of the block dilated by 1
    v = make_views(x, ViewConfig.from_preset("code"), torch.Generator().manual_seed(1))
    usable = 0
    for img in (v["img1"], v["img2"]):
        for b in range(img.shape[0]):
            m = img[b, 0]
            if m.max() == m.min():
                continue  # brightness factor ~0 blanks a view (as the public code's ColorJitter(0, 1))
            usable += 1
            assert m[inside].min() > m[outside].max()
    assert usable >= 44
    assert not torch.equal(v["img1"], v["img2"])
    p = make_views(x, ViewConfig.from_preset("paper"), torch.Generator().manual_seed(1))
    assert torch.equal(p["img1"], p["img2"]) and torch.allclose(p["img1"], minmax(x))


@pytest.mark.parametrize("shape", [(12, 10), (8, 10, 6)])
def test_spatial_flip_only_config_is_a_mirror(shape):
    x = torch.randn((3, 2) + shape)
    cfg = SpatialViewConfig(flip_prob=1.0, p_deform=0.0)
    out = apply_spatial(x, sample_spatial_params(cfg, 3, shape))
    torch.testing.assert_close(out, x.flip(list(range(2, x.ndim))), atol=1e-5, rtol=0)
    cfg = SpatialViewConfig(flip_prob=1.0, flip_axes=(1,), p_deform=0.0)
    torch.testing.assert_close(apply_spatial(x, sample_spatial_params(cfg, 3, shape)), x.flip(3), atol=1e-5, rtol=0)


def test_spatial_rotation_by_config():
    x = torch.randn(2, 1, 9, 9)
    cfg = SpatialViewConfig(flip_prob=0.0, p_deform=1.0, elastic=False, rotation=(math.pi / 2, math.pi / 2),
                            scale=(1.0, 1.0))
    out = apply_spatial(x, sample_spatial_params(cfg, 2, (9, 9)))
    # output voxel (i, j) samples the input at c + R (x - c) = (n - 1 - j, i)
    expected = torch.stack([torch.stack([x[:, :, 8 - j, i] for j in range(9)], -1) for i in range(9)], -2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_spatial_affine_matches_scipy_reference():
    """Random rotation + scale + flips from the config, checked against scipy.ndimage.affine_transform."""
    g = torch.Generator().manual_seed(0)
    shape = (20, 16)
    x = torch.randn((6, 1) + shape, generator=g)
    cfg = SpatialViewConfig(flip_prob=0.5, p_deform=1.0, elastic=False, rotation=(0.2, 1.0), scale=(0.8, 1.2))
    params = sample_spatial_params(cfg, 6, shape, g)
    out = apply_spatial(x, params)
    c = (np.array(shape) - 1) / 2
    for b in range(6):
        a, s = float(params.angle[b]), float(params.scale[b])
        assert 0.2 <= a <= 1.0 and 0.8 <= s <= 1.2
        rot = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        flip = np.diag(np.where(params.flips[b].numpy(), -1.0, 1.0))
        matrix = flip @ rot  # output voxel x samples input at flip(rot(x - c)) + c
        ref = ndimage.affine_transform(x[b, 0].double().numpy(), matrix, offset=c - matrix @ c, order=1,
                                       mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(out[b, 0].numpy(), ref, atol=1e-4)


def test_spatial_branch_probabilities_and_elastic_by_config():
    g = torch.Generator().manual_seed(0)
    cfg = SpatialViewConfig(p_deform=0.67, flip_prob=0.5, elastic=False)
    p = sample_spatial_params(cfg, 4000, (4, 4), g)
    assert abs(p.deform.float().mean().item() - 0.67) < 0.03
    assert abs(p.flips.float().mean().item() - 0.5) < 0.03
    crop = ~p.deform
    assert torch.equal(p.matrix[crop], torch.eye(2, dtype=torch.float64).expand(int(crop.sum()), 2, 2))
    assert torch.all(p.translation[crop] == 0)  # crop_scale (1, 1): the code's same-size crop = identity
    assert p.displacement is None
    mags = []
    for alpha in (100.0, 300.0):
        cfg = SpatialViewConfig(p_deform=1.0, elastic_alpha=(alpha, alpha), elastic_sigma=(4.0, 4.0))
        q = sample_spatial_params(cfg, 8, (32, 32), torch.Generator().manual_seed(1))
        mags.append(q.displacement.abs().mean().item())
    assert mags[1] / mags[0] == pytest.approx(3.0, rel=1e-4)  # same noise, displacement proportional to alpha


def test_view_shapes_3d_and_presets():
    x = torch.randn(2, 1, 16, 16, 8)
    v = make_views(x, ViewConfig.from_preset("code"), torch.Generator().manual_seed(0), return_params=True)
    for k in ("img1", "img2", "img3", "img4"):
        assert v[k].shape == x.shape and 0 <= v[k].min() and v[k].max() <= 1
    assert ViewConfig.from_preset("paper").spatial == ViewConfig.from_preset("code").spatial
    assert not ViewConfig.from_preset("paper").intensity.enabled
    with pytest.raises(ValueError, match="'simclr'"):
        ViewConfig.from_preset("simclr")
    assert IntensityViewConfig().blur_kernel == 3


# ------------------------------------------------------------------------------------------- phantom
def test_phantom_deterministic_varied_and_readable(tmp_path):
    cfg = PhantomConfig(n_subjects=3, shape=(32, 32, 16), seed=5)
    a_img, a_lab = generate_subject(cfg, 1)
    b_img, b_lab = generate_subject(cfg, 1)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = generate_subject(PhantomConfig(n_subjects=3, shape=(32, 32, 16), seed=6), 1)
    assert not np.array_equal(a_lab, c_lab)
    centroids = []
    for i in range(3):
        img, lab = generate_subject(cfg, i)
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        for k in range(1, 5):  # each structure is brighter than body tissue on average
            assert img[0][lab == k].mean() > img[0][(lab == 0) & (img[0] > img[0].mean() * 0.5)].mean()
        centroids.append(ndimage.center_of_mass(lab == 1))
    assert len({tuple(np.round(c, 1)) for c in centroids}) == 3
    for layout, channels in (("nnunet", 2), ("msd", 2)):
        root = write_phantom_dataset(tmp_path / layout, PhantomConfig(n_subjects=2, shape=(24, 24, 16),
                                                                      n_channels=channels, layout=layout))
        index = open_dataset(root)
        assert [c.case_id for c in index.labelled()] == ["phantom_000", "phantom_001"]
        raw = load_case(index.cases[1], allowed_labels=index.allowed_label_values)
        img, lab = generate_subject(PhantomConfig(n_subjects=2, shape=(24, 24, 16), n_channels=channels), 1)
        np.testing.assert_array_equal(raw.image, img)
        np.testing.assert_array_equal(raw.label, lab)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    write_phantom_dataset(root, PhantomConfig(n_subjects=2, shape=(24, 24, 16), n_channels=2, layout="msd"))
    assert (root / "dataset.json").stat().st_mtime_ns == stamp  # same config: reused


def test_window_pads_outside():
    a = np.arange(12).reshape(1, 3, 4)
    w = window(a, (-1, 2), (3, 4), pad_value=-1)
    np.testing.assert_array_equal(w[0], [[-1, -1, -1, -1], [2, 3, -1, -1], [6, 7, -1, -1]])
