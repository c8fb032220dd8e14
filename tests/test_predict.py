"""`macl predict` writes masks in each image's own space; `macl evaluate --predictions` scores any folder of masks
and, on a run's own predictions, reproduces the run's summary.json (issue 14)."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset
from macl.data.errors import DataError
from macl.data.preprocess import reorient
from macl.predict import evaluate_predictions, to_image_grid


def _flat(d, prefix=""):
    """Nested dicts of numbers -> {"a/b/c": value}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_numbers(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        assert (x is None and y is None) or x == pytest.approx(y, rel=1e-9, nan_ok=True), (k, x, y)


def _oblique_affine(spacing=(0.9, 1.4, 2.5)):
    """A rotated (about z by 20°, about x by 10°) LPS-ish grid: voxel axes neither aligned with RAS nor isotropic."""
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    flip = np.diag([-1.0, -1.0, 1.0])                      # L-P-S voxel axes: reorientation has work to do
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ flip @ np.diag(spacing)
    aff[:3, 3] = (12.5, -30.0, 7.25)
    return aff


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    root = write_phantom_dataset(tmp_path_factory.mktemp("obl") / "Dataset004_Oblique",
                                 PhantomConfig(n_subjects=4, shape=(36, 32, 8), seed=8))
    aff = _oblique_affine()
    for path in list((root / "imagesTr").glob("*.nii.gz")) + list((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        out = nib.Nifti1Image(data, aff)
        out.set_qform(aff, code=1)
        out.set_sform(aff, code=2)
        nib.save(out, str(path))
    return root


def test_mask_round_trip_through_reorientation_is_exact():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(9, 7, 5)).astype(np.int16)
    aff = _oblique_affine()
    _, moved, moved_aff = reorient(np.zeros((1, 9, 7, 5), np.float32), mask, aff, "RAS")
    assert moved.shape != mask.shape or not np.array_equal(moved, mask)   # the grids do differ
    assert np.array_equal(to_image_grid(moved, moved_aff, mask.shape, aff), mask)


@pytest.mark.slow
def test_predict_writes_input_space_masks_and_evaluate_reproduces_the_summary(oblique, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(oblique), "--out", str(ft), "--steps", "2", "--batch-size", "2",
                     "--patch-size", "32", "--base-width", "4", "--depth", "3", "--device", "cpu",
                     "--test-fraction", "0.5", "--no-progress"]) == 0
    test_cases = json.loads((ft / "split.json").read_text())["test"]
    assert len(test_cases) == 2
    cases = tmp_path / "cases.txt"
    cases.write_text("\n".join(test_cases))
    masks = tmp_path / "masks"
    assert cli.main(["predict", "--run", str(ft), "--data", str(oblique), "--out", str(masks), "--cases",
                     str(cases), "--no-progress"]) == 0
    for cid in test_cases:
        src = nib.load(str(oblique / "imagesTr" / f"{cid}_0000.nii.gz"))
        out = nib.load(str(masks / f"{cid}.nii.gz"))
        assert out.shape == src.shape[:3] == (36, 32, 8)
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(out.header.get_zooms()[:3], src.header.get_zooms()[:3], rtol=1e-6)
        np.testing.assert_allclose(out.header.get_zooms()[:3], (0.9, 1.4, 2.5), rtol=1e-5)
        assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
        assert np.issubdtype(out.get_data_dtype(), np.integer)
    capsys.readouterr()
    assert cli.main(["evaluate", "--predictions", str(masks), "--data", str(oblique), "--cases", str(cases),
                     "--no-progress"]) == 0
    ours = json.loads((masks / "summary.json").read_text())
    run = json.loads((ft / "summary.json").read_text())
    assert [c["case_id"] for c in ours["metric_per_case"]] == [c["case_id"] for c in run["metric_per_case"]]
    for a, b in zip(ours["metric_per_case"], run["metric_per_case"]):
        _same_numbers(a["metrics"], b["metrics"])
        assert a["prediction_file"].endswith(f"{a['case_id']}.nii.gz")
    _same_numbers(ours["mean"], run["mean"])
    _same_numbers(ours["foreground_mean"], run["foreground_mean"])
    assert ours["class_names"] == run["class_names"] and ours["n_cases"] == run["n_cases"] == 2
    # with --run: its test cases, pre-processing and class names; the same numbers
    again = evaluate_predictions(masks, oblique, run_dir=ft, out=tmp_path / "s2.json")
    _same_numbers(again["foreground_mean"], run["foreground_mean"])


def test_evaluate_refuses_a_mask_off_the_image_grid(oblique, tmp_path):
    masks = tmp_path / "m"
    masks.mkdir()
    cid = "phantom_000"
    ref = nib.load(str(oblique / "labelsTr" / f"{cid}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(ref.dataobj), np.eye(4)), str(masks / f"{cid}_seg.nii.gz"))
    with pytest.raises(DataError, match="voxel grid"):
        evaluate_predictions(masks, oblique, [cid])
    # the reference label itself, under MONAI's _seg name, scores Dice 1
    nib.save(ref, str(masks / f"{cid}_seg.nii.gz"))
    summary = evaluate_predictions(masks, oblique, [cid])
    assert summary["n_cases"] == 1
    assert all(v["Dice"] == 1.0 for v in summary["metric_per_case"][0]["metrics"].values() if v["n_ref"] > 0)
