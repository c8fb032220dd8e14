"""The pre-training-value benchmark's machinery: the anatomy converter, the job plan, one tiny real cell, the stats."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest

from benchmarks import make_anatomy_dataset as mad
from benchmarks import pretraining_value as pv
from benchmarks import pretraining_value_report as rep


def _fake_source(tmp_path, shape=(20, 24, 40)):
    """atlas.nii.gz / atlas_mask.nii.gz: an ellipsoid 'brain' of three concentric intensity shells (+ 2% noise)."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z * 1.1) ** 2)
    mask = r < 0.9
    truth = np.zeros(shape, np.uint8)
    truth[mask] = 1
    truth[r < 0.6] = 2
    truth[r < 0.3] = 3
    image = np.choose(truth, [0.1, 1.0, 2.0, 3.0]).astype(np.float32) + rng.normal(0, 0.02, shape).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(src / mad.IMAGE_NAME))
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), str(src / mad.MASK_NAME))
    return src, truth


def test_kmeans_1d_recovers_separated_clusters_in_order():
    rng = np.random.default_rng(1)
    centres = np.array([5.0, -3.0, 1.0])
    truth = rng.integers(0, 3, 600)
    values = centres[truth] + rng.normal(0, 0.1, 600)
    got = mad.kmeans_1d(values, 3)
    rank = np.argsort(np.argsort(centres))  # cluster index ordered by increasing centre
    np.testing.assert_array_equal(got, rank[truth])


def test_slab_ranges_leave_gaps_and_stay_inside():
    assert mad.slab_ranges(20, 4, 2) == [(0, 4), (6, 10), (12, 16)]
    assert mad.slab_ranges(22, 4, 2)[-1] == (18, 22)
    with pytest.raises(ValueError, match="slab"):
        mad.slab_ranges(10, 0, 1)


def test_converter_writes_msd_slabs_with_tissue_labels(tmp_path):
    from macl.data import open_dataset
    src, truth = _fake_source(tmp_path)
    out = tmp_path / "anat"
    prov = mad.make_dataset(out, src, slab=4, gap=1, margin=0, test_every=3, smooth=0.0, bias_sigma=0.0)
    index = open_dataset(out)
    ids = sorted(c.case_id for c in index.labelled())
    assert ids == sorted(prov["train"] + prov["test"])
    assert prov["test"] == [i for n, i in enumerate(ids) if n % 3 == 1]
    assert index.labels == mad.CLASS_NAMES
    # each slab's labels equal the truth over the slab's z range (the crop starts at the mask's box)
    idx = np.argwhere(truth > 0)
    lo = idx.min(0)
    for n, (a, b) in enumerate(prov["slabs"]):
        lab = np.asarray(nib.load(str(out / "labelsTr" / f"robex_slab{n:02d}.nii.gz")).dataobj)
        img = nib.load(str(out / "imagesTr" / f"robex_slab{n:02d}.nii.gz"))
        ref = truth[lo[0]:idx.max(0)[0] + 1, lo[1]:idx.max(0)[1] + 1, lo[2] + a:lo[2] + b]
        np.testing.assert_array_equal(lab, ref)
        # the slab sits where it was cut from: its first voxel's world z is the source's
        assert img.affine[2, 3] == pytest.approx(1.5 * (lo[2] + a))
    # pre-training's volume: the training slabs in order, nothing of the test slabs
    stack = np.asarray(nib.load(str(out / prov["pretrain_images"][0])).dataobj)
    train_slabs = [np.asarray(nib.load(str(out / "imagesTr" / f"{c}.nii.gz")).dataobj) for c in prov["train"]]
    np.testing.assert_array_equal(stack, np.concatenate(train_slabs, axis=2))
    # rerunning with the same settings reuses the data set; the default (bias-corrected) labels keep 3 classes
    assert mad.make_dataset(out, src, slab=4, gap=1, margin=0, test_every=3, smooth=0.0, bias_sigma=0.0) == prov
    lab = mad.tissue_labels(np.asarray(nib.load(str(src / mad.IMAGE_NAME)).dataobj), truth > 0)
    assert set(np.unique(lab)) == {0, 1, 2, 3} and np.all(lab[truth == 0] == 0)


def test_plan_keeps_test_volumes_out_and_pairs_labelled_volumes(tmp_path):
    sizes = dataclasses.replace(pv.SIZES["tiny"], budgets=(1, 2), seeds=(0, 1), do_3d=True, depth_3d=1,
                                patch_3d=8)
    sets = pv.prepare_data(sizes, tmp_path)
    s = sets["phantom"]
    assert "anatomy" not in sets or sets["anatomy"]["datalist"].is_file()
    rows = json.loads(s["datalist"].read_text())["training"]
    listed = {p.split("/")[-1].split("_0000")[0] for r in rows for p in r["image"]}
    assert listed == set(s["train"]) and not listed & set(s["test"])
    jobs = pv.plan(sizes, sets, tmp_path, has_preset=True)
    cells = [j for j in jobs if j.cell is not None]
    assert len(cells) == 2 * 2 * len(pv.METHODS_2D) + 2 * len(pv.METHODS_3D)
    assert [j.cell is None for j in jobs] == sorted([j.cell is None for j in jobs], reverse=True)  # pre-training first
    for seed in (0, 1):
        lab = {b: {j.cell["labelled"] for j in cells if j.cell["seed"] == seed and j.cell["budget"] == b
                   and j.cell["dims"] == 2} for b in (1, 2)}
        assert len(lab[1]) == len(lab[2]) == 1  # one labelled set per (seed, budget), shared by every method
        assert set(lab[1].pop().split()) < set(lab[2].pop().split())
    keys = {j.key for j in jobs}
    for j in cells:
        assert j.needs is None or j.needs in keys
        assert ("--pretrained" in j.argv) == (j.needs is not None)
    robust = next(j for j in jobs if j.key == "phantom/2d/pretrain_macl_robust")
    assert robust.argv[robust.argv.index("--preset") + 1] == "robust"
    # without --preset in the CLI the robust rows are left out, not run as something else
    assert not any("macl_robust" in j.key for j in pv.plan(sizes, sets, tmp_path, has_preset=False))


def test_dry_run_lists_every_cell(tmp_path, capsys):
    assert pv.main(["--size", "tiny", "--dry-run", "--out", str(tmp_path / "o"), "--csv", str(tmp_path / "c.csv")]) == 0
    text = capsys.readouterr().out
    for m in ("scratch", "simclr", "pcl", "macl_faithful", "arco_sg", "arco_ns"):
        assert f"phantom/2d/{m}/l1/s0" in text
    assert "train-semi" in text and "--sampler ns" in text
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.slow
def test_one_tiny_real_cell_reports_and_resumes(tmp_path):
    args = ["--size", "tiny", "--only", "phantom/2d/scratch", "--out", str(tmp_path / "o"),
            "--csv", str(tmp_path / "c.csv"), "--doc", str(tmp_path / "doc.md")]
    assert pv.main(args) == 0
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [(r["method"], r["status"]) for r in rows] == [("scratch", "ok")]
    summary = json.loads((tmp_path / "o/runs/phantom/2d/scratch_l1_s0/summary.json").read_text())
    assert float(rows[0]["dice"]) == pytest.approx(summary["foreground_mean"]["Dice"])
    doc = (tmp_path / "doc.md").read_text()
    assert "| scratch | 1 |" in doc and "wall time" in doc and "--only phantom/2d/scratch" in doc
    # a hand-written reading survives a rewrite
    reading = f"{rep.KEEP_BEGIN}\nscratch only: nothing to read\n{rep.KEEP_END}"
    (tmp_path / "doc.md").write_text(doc.replace("## What was run", reading + "\n\n## What was run"))
    assert pv.main(args) == 0  # finished cells are skipped: no second row
    assert len(list(csv.DictReader((tmp_path / "c.csv").open()))) == 1
    assert (tmp_path / "doc.md").read_text().count("scratch only: nothing to read") == 1


def _rows(values: dict) -> list[dict]:
    return [{"dataset": "d", "dims": 2, "budget": 1, "method": m, "seed": s, "dice": v, "hd95": 5.0}
            for m, vs in values.items() for s, v in enumerate(vs)]


def test_compare_matches_a_hand_paired_t_test():
    from scipy.stats import t as student_t
    scratch, macl = [0.50, 0.60, 0.55], [0.56, 0.61, 0.60]
    st = rep.compare(_rows({"scratch": scratch, "macl_faithful": macl}))[("d", 2, 1)]["macl_faithful"]
    d = np.subtract(macl, scratch)
    tval = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert st["p"] == pytest.approx(2 * student_t.sf(abs(tval), 2))
    assert st["diff"] == pytest.approx(d.mean()) and st["wins"] == 3 and st["paired"] == 3
    assert st["dice_std"] == pytest.approx(np.std(macl))


def test_target_needs_every_seed_and_both_baselines():
    good = {"scratch": [0.5, 0.5, 0.5], "macl_robust": [0.53, 0.55, 0.56], "pcl": [0.52] * 3, "simclr": [0.5] * 3}
    stats = rep.compare(_rows(good))
    assert "**Target met**" in rep.target_lines(stats, "macl_robust")[0]
    one_seed_short = dict(good, macl_robust=[0.51, 0.58, 0.6])
    assert "**Target not met**" in rep.target_lines(rep.compare(_rows(one_seed_short)), "macl_robust")[0]
    below_pcl = dict(good, pcl=[0.6] * 3)
    assert "**Target not met**" in rep.target_lines(rep.compare(_rows(below_pcl)), "macl_robust")[0]
