"""The pre-training-value benchmark's machinery: the anatomy converter, the job plan, one tiny real cell, the stats."""
from __future__ import annotations

from pathlib import Path

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


def _sets(tmp_path, sizes=None):
    src, _ = _fake_source(tmp_path, shape=(20, 24, 60))
    sizes = sizes or dataclasses.replace(pv.SIZES["tiny"], seeds=(0, 1))
    return sizes, pv.prepare_data(sizes, tmp_path / "o", str(src)), src


def test_context_labels_split_grey_matter_by_level_only():
    tissue = np.zeros((3, 3, 4), np.uint8)
    tissue[0] = 1
    tissue[1] = 2
    tissue[2] = 3
    out = mad.context_labels(tissue, np.arange(10, 14), z_split=12)
    assert np.all(out[0] == 1) and np.all(out[2] == 4)
    assert np.all(out[1][:, :2] == 2) and np.all(out[1][:, 2:] == 3)  # z 10, 11 inferior; 12, 13 superior


def test_plan_keeps_test_slabs_out_and_shares_the_slabs_of_a_seed(tmp_path):
    sizes, sets, _ = _sets(tmp_path)
    rows = json.loads(sets["datalist"].read_text())["training"]
    assert len(rows) == 1 and "imagesPretrain" in rows[0]["image"][0]  # the stacked training slabs only
    prov = json.loads((sets["tissue"] / "provenance.json").read_text())
    assert set(sets["test"]) == set(prov["test"])
    jobs = pv.plan(sizes, sets, tmp_path / "o")
    pre = [j for j in jobs if j.cell is None]
    assert [j.key for j in pre] == ["pretrain_macl", "pretrain_pcl", "pretrain_simclr", "pretrain_random"]
    assert jobs[:len(pre)] == pre  # pre-training first
    rnd = pre[-1].argv
    assert rnd[rnd.index("--steps") + 1] == "1" and float(rnd[rnd.index("--lr") + 1]) == 1e-30
    assert all(isinstance(a, str) for j in jobs for a in j.argv)  # what subprocess takes
    cells = [j for j in jobs if j.cell is not None]
    assert len(cells) == len(sizes.seeds) * len(pv.TASKS) * 10
    for seed in sizes.seeds:
        sp = sets["splits"][seed]
        assert not set(sp["val"]) & set(sp["few"]) and not set(sp["val"]) & set(sp["full"])
        assert set(sp["few"]) < set(sp["full"]) and not set(sp["full"]) & set(sets["test"])
        for j in cells:
            if j.cell["seed"] != seed:
                continue
            files = {Path(k).name: v for k, v in j.cell["_files"].items()}
            assert files["labelled_cases.txt"] == sp[j.cell["budget"]] and files["val_cases.txt"] == sp["val"]
            assert files["test_cases.txt"] == sets["test"]
            probe = j.cell["method"].startswith("probe_")
            assert ("--freeze" in j.argv) == probe and ("--probe" in j.argv) == j.cell["method"].startswith("linear_")
            assert ("--pretrained" in j.argv) == (j.needs is not None)
            assert (j.needs is None) == (j.cell["method"] == "scratch")
    assert {j.needs for j in cells if j.cell["method"] in ("probe_random", "linear_random")} == {"pretrain_random"}
    # the levels: every set has a slab of each, so the context task's two grey-matter classes are in each
    half = json.loads((sets["context"] / "provenance.json").read_text())["z_split_in_crop"]
    mid = {f"robex_slab{i:02d}": (a + b) / 2 for i, (a, b) in enumerate(prov["slabs"])}
    for sp in sets["splits"].values():
        for ids in sp.values():
            assert {mid[c] < half for c in ids} == {True, False}


def test_dry_run_lists_every_cell(tmp_path, capsys):
    src, _ = _fake_source(tmp_path, shape=(20, 24, 60))
    assert pv.main(["--size", "tiny", "--dry-run", "--out", str(tmp_path / "o"), "--csv", str(tmp_path / "c.csv"),
                    "--anatomy-source", str(src)]) == 0
    text = capsys.readouterr().out
    for m in ("scratch", "macl", "probe_random", "probe_macl", "probe_pcl", "probe_simclr"):
        assert f"context/{m}/few/s0" in text
    assert "tissue/macl/full/s0" in text and "--freeze encoder" in text
    assert not (tmp_path / "c.csv").exists()


def test_lookup_baseline_and_auc_by_hand():
    from benchmarks.pretraining_value_baselines import curve_auc, lookup_dice, lookup_fit
    from macl.data import Volume
    lab = np.zeros((4, 4, 2), np.int16)
    lab[:2] = 1
    lab[2:, :2] = 2
    img = np.where(lab == 1, 1.0, np.where(lab == 2, 3.0, 2.9)).astype(np.float32)[None]  # bg looks like class 2
    vol = Volume("a", img, lab, (1.0, 1.0, 1.0), "a")
    edges, table = lookup_fit([vol], 3, bins=8)
    assert table.min() >= 1  # only foreground classes: the mask decides the background
    dice, summary = lookup_dice([vol], [vol], {0: "bg", 1: "one", 2: "two"}, bins=8)
    assert dice == pytest.approx(1.0)
    # a test volume whose class-2 intensity is class 1's: class 2 is then never predicted
    img2 = np.where(lab == 2, 1.0, img[0])[None].astype(np.float32)
    dice2, s2 = lookup_dice([vol], [Volume("b", img2, lab, (1.0, 1.0, 1.0), "b")], {0: "bg", 1: "one", 2: "two"}, 8)
    assert s2["mean"]["2"]["Dice"] == 0.0 and s2["mean"]["1"]["Dice"] == pytest.approx(2 * 16 / (16 + 24))
    # AUC: trapezoids from (0, 0): (10 * 0.5 / 2 + 10 * (0.5 + 0.7) / 2) / 20
    assert curve_auc([[10, 0.5], [20, 0.7]]) == pytest.approx((2.5 + 6.0) / 20)
    assert math.isnan(curve_auc([]))


@pytest.mark.slow
def test_one_tiny_real_cell_reports_and_resumes(tmp_path):
    src, _ = _fake_source(tmp_path, shape=(20, 24, 60))
    args = ["--size", "tiny", "--only", "context/scratch/few", "--out", str(tmp_path / "o"),
            "--csv", str(tmp_path / "c.csv"), "--doc", str(tmp_path / "doc.md"), "--anatomy-source", str(src)]
    assert pv.main(args) == 0
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [(r["method"], r["status"]) for r in rows] == [("scratch", "ok")]
    summary = json.loads((tmp_path / "o/runs/context/scratch_few_s0/summary.json").read_text())
    assert float(rows[0]["dice"]) == pytest.approx(summary["foreground_mean"]["Dice"])
    assert int(rows[0]["kept_step"]) == summary["kept"]["step"]
    doc = (tmp_path / "doc.md").read_text()
    assert "| scratch |" in doc and "wall time" in doc and "--only context/scratch/few" in doc
    reading = f"{rep.KEEP_BEGIN}\nscratch only: nothing to read\n{rep.KEEP_END}"
    (tmp_path / "doc.md").write_text(doc.replace("## What was run", reading + "\n\n## What was run"))
    assert pv.main(args) == 0  # finished cells are skipped: no second row
    assert len(list(csv.DictReader((tmp_path / "c.csv").open()))) == 1
    assert (tmp_path / "doc.md").read_text().count("scratch only: nothing to read") == 1


def _rows(values: dict, task="context", budget="few") -> list[dict]:
    return [{"task": task, "budget": budget, "n_labelled": 2, "method": m, "seed": s, "dice": v, "hd95": 5.0,
             "auc": 0.5, "kept_step": 10} for m, vs in values.items() for s, v in enumerate(vs)]


def test_compare_matches_a_hand_paired_t_test():
    from scipy.stats import t as student_t
    scratch, macl = [0.50, 0.60, 0.55], [0.56, 0.61, 0.60]
    st = rep.compare(_rows({"scratch": scratch, "macl": macl}))[("context", "few")]["macl"]
    d = np.subtract(macl, scratch)
    tval = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert st["p"] == pytest.approx(2 * student_t.sf(abs(tval), 2))
    assert st["diff"] == pytest.approx(d.mean()) and st["wins"] == 3 and st["paired"] == 3
    assert st["dice_std"] == pytest.approx(np.std(macl))


def test_target_needs_every_seed_on_both_rows():
    good = {"scratch": [0.5] * 3, "macl": [0.53, 0.55, 0.56], "probe_random": [0.3] * 3,
            "probe_macl": [0.36, 0.4, 0.37]}
    assert "**Target met**" in rep.target_lines(rep.compare(_rows(good)))[0]
    short = dict(good, probe_macl=[0.36, 0.34, 0.4])
    assert "**Target not met**" in rep.target_lines(rep.compare(_rows(short)))[0]
    assert "**Target not met**" in rep.target_lines(rep.compare(_rows(good, task="tissue")))[0]
