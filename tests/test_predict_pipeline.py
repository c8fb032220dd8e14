"""Issue 22 items 3, 4, 5: evaluation counts what is missing, one resampling path, predict like a pipeline.

- ``macl evaluate --predictions`` with a mask missing: an error naming the case, or with ``--missing-as-empty``
  the case scored as an empty mask (Dice 0) and listed; ``reference_file`` names the label file.
- evaluate(predict(run)) reproduces the run's summary.json to 1e-6, with and without ``--spacing``.
- ``macl predict`` with a truncated or NaN image as the third case: without ``--skip-bad`` no mask file (or
  temporary file) of that case exists; with it the others are written and the skip is reported. A broken label
  that predict (or pretrain) does not use does not stop it.
Tiny runs: phantoms 32 x 32 x 8 (oblique, anisotropic grid for the resampling test), width 4, 2 steps.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset

FT = ["--steps", "2", "--batch-size", "2", "--patch-size", "32", "--base-width", "4", "--depth", "3",
      "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _oblique_affine(spacing=(0.9, 1.4, 2.5)):
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff[:3, 3] = (12.5, -30.0, 7.25)
    return aff


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """Six labelled phantoms on an oblique, anisotropic (0.9, 1.4, 2.5) mm grid (nnU-Net layout)."""
    root = write_phantom_dataset(tmp_path_factory.mktemp("obl") / "Dataset005_Obl",
                                 PhantomConfig(n_subjects=6, shape=(36, 32, 8), seed=8))
    aff = _oblique_affine()
    for path in list((root / "imagesTr").glob("*.nii.gz")) + list((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(path))
        out = nib.Nifti1Image(np.asanyarray(img.dataobj), aff)
        out.set_qform(aff, code=1)
        out.set_sform(aff, code=2)
        nib.save(out, str(path))
    return root


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("macl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_numbers(a, b, tol=1e-6):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        assert (x is None and y is None) or abs(x - y) <= tol, (k, x, y)


# ------------------------------------------------------------------------------------------ item 3
def test_a_missing_mask_is_an_error_or_scored_empty(oblique, tmp_path, capsys):
    masks = tmp_path / "masks"
    shutil.copytree(oblique / "labelsTr", masks)  # the reference labels as "predictions": Dice 1 each
    (masks / "phantom_003.nii.gz").unlink()
    assert cli.main(["evaluate", "--predictions", str(masks), "--data", str(oblique), "--no-progress"]) == 1
    line = _one_error(capsys)
    assert "no mask for 1 of 6 case(s): phantom_003" in line and "--missing-as-empty" in line, line
    assert not (masks / "summary.json").exists()

    assert cli.main(["evaluate", "--predictions", str(masks), "--data", str(oblique), "--missing-as-empty",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 case(s) had no mask and were scored as empty (Dice 0): phantom_003" in out
    summary = json.loads((masks / "summary.json").read_text())
    assert summary["n_cases"] == 6 and summary["missing_predictions"] == ["phantom_003"]
    rows = {r["case_id"]: r for r in summary["metric_per_case"]}
    assert rows["phantom_003"]["missing"] is True and rows["phantom_003"]["prediction_file"] is None
    for cid, row in rows.items():
        assert row["reference_file"] == str(oblique / "labelsTr" / f"{cid}.nii.gz")  # the label, not the image
        for m in row["metrics"].values():
            if m["n_ref"] > 0:
                assert m["Dice"] == (0.0 if cid == "phantom_003" else 1.0), (cid, m)
    # the means count the empty case: a class present in all six cases has mean Dice 5/6
    for k, mean in summary["mean"].items():
        present = sum(rows[c]["metrics"][k]["n_ref"] > 0 for c in rows)
        if present == 6:
            assert mean["Dice"] == pytest.approx(5 / 6, abs=1e-12)


def _unwritable(folder: Path):
    """Make `folder` unwritable (chmod, or chattr +i for root); returns the undo, or None when impossible."""
    import os
    import subprocess
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


def test_evaluate_into_a_read_only_folder_fails_early_naming_it(oblique, tmp_path, capsys, monkeypatch):
    masks = tmp_path / "ro"
    shutil.copytree(oblique / "labelsTr", masks)
    undo = _unwritable(masks)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here")
    from macl import predict
    scored = []
    monkeypatch.setattr(predict, "score_in_image_space", lambda *a, **k: scored.append(1))
    try:
        assert cli.main(["evaluate", "--predictions", str(masks), "--data", str(oblique), "--no-progress"]) == 1
        line = _one_error(capsys)
    finally:
        undo()
    assert line.startswith(f"macl: error: {masks}: cannot write into this folder"), line
    assert "summary.json" not in line and ".tmp" not in line.split(str(masks))[-1] and not scored  # before scoring


# ------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("spacing", [None, "1,1,2"])
def test_evaluate_of_predict_reproduces_the_runs_summary(oblique, tmp_path, capsys, spacing):
    ft = tmp_path / "ft"
    extra = ["--spacing", spacing] if spacing else []
    assert cli.main(["finetune", "--data", str(oblique), "--out", str(ft), *FT, "--test-fraction", "0.34",
                     *extra]) == 0
    run = json.loads((ft / "summary.json").read_text())
    masks = tmp_path / "masks"
    assert cli.main(["predict", "--run", str(ft), "--data", str(oblique), "--out", str(masks), "--no-progress"]) == 0
    assert cli.main(["evaluate", "--predictions", str(masks), "--data", str(oblique), "--run", str(ft),
                     "--no-progress"]) == 0
    ours = json.loads((masks / "summary.json").read_text())
    assert [c["case_id"] for c in ours["metric_per_case"]] == [c["case_id"] for c in run["metric_per_case"]]
    assert len(run["metric_per_case"]) == 2
    _same_numbers(ours["mean"], run["mean"])
    _same_numbers(ours["foreground_mean"], run["foreground_mean"])
    for a, b in zip(ours["metric_per_case"], run["metric_per_case"]):
        _same_numbers(a["metrics"], b["metrics"])
        assert a["reference_file"] == b["reference_file"] and a["reference_file"].endswith(
            f"labelsTr/{a['case_id']}.nii.gz")
    # and `macl evaluate --run` (the model again) writes the same numbers as fine-tuning did
    assert cli.main(["evaluate", "--run", str(ft), "--data", str(oblique), "--no-progress"]) == 0
    _same_numbers(json.loads((ft / "summary.json").read_text())["mean"], run["mean"])
    if spacing:  # the run did train on another grid than the images'
        resolved = json.loads((ft / "resolved_config.json").read_text())
        assert resolved["finetune"]["preprocess"]["spacing"] == [1.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------ item 5
@pytest.fixture(scope="module")
def small_run(oblique, tmp_path_factory):
    ft = tmp_path_factory.mktemp("ftp") / "ft"
    assert cli.main(["finetune", "--data", str(oblique), "--out", str(ft), *FT, "--test-fraction", "0.34"]) == 0
    return ft


def _break(ds: Path, how: str) -> Path:
    """Make the third case's image bad: truncated, or holding NaN voxels."""
    path = sorted((ds / "imagesTr").glob("*.nii.gz"))[2]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).astype(np.float32)
        data[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return path


@pytest.mark.parametrize("how", ["truncated", "nan"])
def test_predict_with_a_bad_third_case(oblique, small_run, tmp_path, capsys, how):
    ds = tmp_path / "ds"
    shutil.copytree(oblique, ds)
    _break(ds, how)
    bad = "phantom_002"
    out = tmp_path / "masks"
    assert cli.main(["predict", "--run", str(small_run), "--data", str(ds), "--out", str(out), "--no-progress"]) == 1
    line = _one_error(capsys)
    assert "phantom_002_0000.nii.gz" in line, line
    assert not list(out.glob(f"{bad}*")) and not list(out.glob("*tmp*"))  # no mask, half or whole, of the case

    out2 = tmp_path / "masks2"
    assert cli.main(["predict", "--run", str(small_run), "--data", str(ds), "--out", str(out2), "--skip-bad",
                     "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out2.iterdir()) == [f"phantom_00{i}.nii.gz" for i in (0, 1, 3, 4, 5)]
    assert "5 mask(s) written" in printed.out and f"skipped 1 case(s) that could not be read: {bad} (" in printed.out
    assert f"skipping case {bad}" in printed.err


def test_predict_and_pretrain_ignore_a_broken_label_they_do_not_use(oblique, small_run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(oblique, ds)
    lab = ds / "labelsTr" / "phantom_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(lab))  # wrong shape
    out = tmp_path / "masks"
    assert cli.main(["predict", "--run", str(small_run), "--data", str(ds), "--out", str(out), "--no-progress"]) == 0
    assert (out / "phantom_001.nii.gz").is_file() and len(list(out.glob("*.nii.gz"))) == 6
    assert cli.main(["pretrain", "--data", str(ds), "--out", str(tmp_path / "pre"), "--steps", "1",
                     "--patch-size", "32", "--batch-size", "2", "--base-width", "4", "--depth", "2",
                     "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    # fine-tuning does use the labels: there the same file is an error naming it
    capsys.readouterr()
    assert cli.main(["finetune", "--data", str(ds), "--out", str(tmp_path / "ft"), *FT]) == 1
    assert str(lab) in _one_error(capsys)
