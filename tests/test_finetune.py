"""macl.finetune: label budgets, training runs, inference, metrics against MONAI, checkpoints, resume."""
import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot
from torch import nn

import macl.finetune as ft
from macl.data import DataError, PhantomConfig, Volume, write_phantom_dataset
from macl.data.splits import read_case_list, select_labelled, split_cases
from macl.finetune import (FinetuneConfig, case_metrics, evaluate, evaluate_run, finetune, predict_volume,
                           save_checkpoint)

PHANTOM = PhantomConfig(n_subjects=6, shape=(24, 24, 16), seed=11)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), PHANTOM)


class TinySeg(nn.Module):
    def __init__(self, in_ch: int, k: int, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.net = nn.Sequential(conv(in_ch, 8, 3, padding=1), nn.ReLU(), conv(8, k, 1))

    def forward(self, x):
        return self.net(x)


class NearestClass(nn.Module):
    """Logits -(x - k)^2: argmax is the class nearest to the (first channel's) intensity."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.stack([-(x[:, 0] - c) ** 2 for c in range(self.k)], 1)


def _cfg(**kw):
    base = dict(dims=2, patch_size=(24, 24), steps=4, batch_size=4, checkpoint_every=2, log_every=1,
                labels_fraction=0.5, test_fraction=0.34, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


# -------------------------------------------------------------------------------------- label budget
def test_label_selection_deterministic_by_seed():
    ids = [f"case_{i:02d}" for i in range(20)]
    a = select_labelled(ids, fraction=0.25, seed=1)
    assert a == select_labelled(list(reversed(ids)), fraction=0.25, seed=1)  # listing order does not matter
    assert len(a) == 5 and a == sorted(a)
    assert select_labelled(ids, fraction=0.25, seed=2) != a
    assert set(select_labelled(ids, fraction=0.1, seed=1)) <= set(a)  # budgets are nested
    assert select_labelled(ids, fraction=0.01, seed=1) != []  # at least one case
    assert select_labelled(ids, cases=["case_03", "case_01"]) == ["case_01", "case_03"]
    with pytest.raises(ValueError, match="case_99"):
        select_labelled(ids, cases=["case_99"])
    with pytest.raises(ValueError, match="got 1.5"):
        select_labelled(ids, fraction=1.5)
    train, test = split_cases(ids, 0.2, seed=0)
    assert len(test) == 4 and not set(train) & set(test) and split_cases(ids[::-1], 0.2, seed=0) == (train, test)


def test_read_case_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "b.txt").write_text("# labelled\nx\n\nz\n")
    assert read_case_list(tmp_path / "a.json") == ["x", "y"]
    assert read_case_list(tmp_path / "b.txt") == ["x", "z"]
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(DataError, match="c.txt: the case list is empty"):
        read_case_list(tmp_path / "c.txt")


# ------------------------------------------------------------------------------------------ training
def test_finetune_run_writes_its_record(phantom, tmp_path):
    cfg = _cfg()
    res = finetune(phantom, tmp_path / "run", lambda c, k: TinySeg(c, k), cfg)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    ids = [f"phantom_{i:03d}" for i in range(6)]
    train, test = split_cases(ids, 0.34, seed=3)
    assert split["train"] == train == res.train and split["test"] == test == res.test
    expected = select_labelled(train, fraction=0.5, seed=3)
    assert json.loads((run / "labelled_cases.json").read_text()) == expected == res.labelled
    assert res.num_classes == 5 and res.class_names[3] == "vessel"
    log = [json.loads(line) for line in (run / "finetune_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["lr"] == pytest.approx(cfg.min_lr)  # cosine decay reaches min_lr at the last step
    saved = json.loads((run / "finetune_config.json").read_text())
    assert FinetuneConfig(**saved["config"]) == cfg
    summary = json.loads((run / "summary.json").read_text())
    assert [c["case_id"] for c in summary["metric_per_case"]] == test
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
    # the same seed in a new folder picks the same cases; evaluate_run reproduces summary.json
    res2 = finetune(phantom, tmp_path / "run2", lambda c, k: TinySeg(c, k), _cfg(steps=1))
    assert res2.labelled == res.labelled
    (run / "summary.json").unlink()
    again = evaluate_run(run, phantom, lambda c, k: TinySeg(c, k))
    assert json.loads((run / "summary.json").read_text())["metric_per_case"] == summary["metric_per_case"]
    assert again["n_cases"] == len(test)


def test_finetune_3d(phantom, tmp_path):
    cfg = _cfg(dims=3, patch_size=(16, 16, 8), steps=2, batch_size=2)
    res = finetune(phantom, tmp_path / "run3d", lambda c, k: TinySeg(c, k, dims=3), cfg)
    assert (tmp_path / "run3d" / "summary.json").is_file() and res.last_loss > 0


def test_resume_after_interruption_gives_the_same_model(phantom, tmp_path):
    factory = lambda c, k: TinySeg(c, k)  # noqa: E731
    cfg = _cfg(steps=6, checkpoint_every=3)
    straight = finetune(phantom, tmp_path / "a", factory, cfg, evaluate_test=False)

    class Killed(Exception):
        pass

    def die_at_5(step, total, info):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        finetune(phantom, tmp_path / "b", factory, cfg, progress=die_at_5, evaluate_test=False)
    assert torch.load(tmp_path / "b" / "checkpoint_latest.pt", weights_only=True)["step"] == 3
    resumed = finetune(phantom, tmp_path / "b", factory, cfg, evaluate_test=False)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    log = [json.loads(line) for line in (tmp_path / "b" / "finetune_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the lost steps 4-5 are logged once, as redone
    with pytest.raises(ValueError, match="another split"):
        finetune(phantom, tmp_path / "b", factory, _cfg(steps=6, labels_fraction=1.0), evaluate_test=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk died")

    monkeypatch.setattr(ft.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk died"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    back = torch.load(path, weights_only=True)
    assert back["step"] == 1 and torch.equal(back["w"], torch.ones(3))


def test_pretrained_weights_are_loaded(phantom, tmp_path):
    donor = TinySeg(1, 5)
    state = {k: v.clone() for k, v in donor.state_dict().items() if k.startswith("net.0.")}
    torch.save({"state_dict": state, "net": {}}, tmp_path / "weights.pt")
    cfg = _cfg(steps=1, lr=1e-12, min_lr=0.0)
    res = finetune(phantom, tmp_path / "run", lambda c, k: TinySeg(c, k), cfg, pretrained=tmp_path / "weights.pt",
                   evaluate_test=False)
    assert res.loaded_pretrained == ["net.0.bias", "net.0.weight"]
    record = json.loads((tmp_path / "run" / "pretrained_load.json").read_text())
    assert record["loaded"] == res.loaded_pretrained
    torch.testing.assert_close(res.model.state_dict()["net.0.weight"], state["net.0.weight"], atol=1e-9, rtol=0)
    with pytest.raises(KeyError, match="encoder.stem.weight"):
        finetune(phantom, tmp_path / "run_bad", lambda c, k: TinySeg(c, k), cfg,
                 pretrained={"encoder.stem.weight": torch.zeros(1)})


def test_wrong_network_output_is_named(phantom, tmp_path):
    with pytest.raises(ValueError, match=r"to \(4, 3, 24, 24\); expected \(4, 5, 24, 24\)"):
        finetune(phantom, tmp_path / "r", lambda c, k: TinySeg(c, 3), _cfg(steps=1))


def test_bad_data_stops_before_the_run_folder_is_made(phantom, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    (data / "labelsTr" / "phantom_002.nii.gz").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="phantom_002.nii.gz: cannot read NIfTI"):
        finetune(data, tmp_path / "run", lambda c, k: TinySeg(c, k), _cfg(steps=1))
    assert not (tmp_path / "run").exists()
    res = finetune(data, tmp_path / "run", lambda c, k: TinySeg(c, k), _cfg(steps=1, skip_bad=True))
    assert "phantom_002" not in res.train + res.test


# ----------------------------------------------------------------------------------- inference, metrics
@pytest.mark.parametrize("dims, patch", [(2, (16, 16)), (3, (16, 16, 8))])
def test_sliding_window_inference_reassembles_the_volume(dims, patch):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (21, 26, 11)).astype(np.int16)  # not a multiple of the window
    cfg = FinetuneConfig(dims=dims, patch_size=patch, sw_batch_size=3)
    pred = predict_volume(NearestClass(4), label[None].astype(np.float32), cfg, slice_batch=4)
    np.testing.assert_array_equal(pred, label)


def _blob(shape, centre, radius, spacing):
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    c = np.asarray(centre, dtype=float).reshape(3, 1, 1, 1) * np.asarray(spacing).reshape(3, 1, 1, 1)
    return ((grid - c) ** 2).sum(0) < radius ** 2


def _monai(pred, ref, k, spacing):
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], k)
    r = one_hot(torch.from_numpy(ref.astype(np.int64))[None, None], k)
    dice = DiceMetric(include_background=False, reduction="none")(p, r)[0].numpy()
    hd = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=list(spacing))[0].numpy()
    return dice, hd


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside HD
def test_summary_matches_monai_on_the_same_predictions(tmp_path):
    spacing = (1.5, 1.2, 3.0)
    shape = (28, 30, 14)
    rng = np.random.default_rng(0)
    volumes = []
    for i in range(3):
        ref = np.zeros(shape, np.int16)
        ref[_blob(shape, (10 + i, 12, 6), 9.0, spacing)] = 1
        ref[_blob(shape, (19, 19 - i, 8), 6.0 + i, spacing)] = 2
        ref[rng.random(shape) < 0.002] = 3  # scattered voxels: a hard case for surfaces
        pred = ref.copy()
        pred[_blob(shape, (12, 13 + i, 7), 8.0, spacing)] = 1  # shifted, resized blob
        pred[np.roll(ref == 2, 1 + i, axis=2)] = 2
        pred[rng.random(shape) < 0.003] = 3
        volumes.append(Volume(f"c{i}", pred[None].astype(np.float32), ref, spacing, np.eye(4), f"c{i}.nii.gz"))
    names = {0: "background", 1: "a", 2: "b", 3: "c"}
    preds = {}
    evaluate(NearestClass(4), volumes, FinetuneConfig(dims=3, patch_size=(16, 16, 8)), tmp_path / "summary.json",
             names, predictions=preds)
    summary = json.loads((tmp_path / "summary.json").read_text())
    dices, hds = [], []
    for case, vol in zip(summary["metric_per_case"], volumes):
        np.testing.assert_array_equal(preds[vol.case_id], np.asarray(vol.image[0], dtype=np.int16))
        dice, hd = _monai(preds[vol.case_id], vol.label, 4, spacing)
        for k in (1, 2, 3):
            assert case["metrics"][str(k)]["Dice"] == pytest.approx(float(dice[k - 1]), abs=1e-6)
            assert case["metrics"][str(k)]["HD95"] == pytest.approx(float(hd[k - 1]), rel=1e-5, abs=1e-5)
        dices.append(dice)
        hds.append(hd)
    for k in (1, 2, 3):
        assert summary["mean"][str(k)]["Dice"] == pytest.approx(float(np.mean([d[k - 1] for d in dices])), abs=1e-6)
        assert summary["mean"][str(k)]["HD95"] == pytest.approx(float(np.mean([h[k - 1] for h in hds])), rel=1e-5)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        float(np.mean([summary["mean"][k]["Dice"] for k in ("1", "2", "3")])))
    assert hds[0][2] > hds[0][0] > 0  # the values compared are not trivial


def test_empty_mask_conventions(tmp_path):
    shape = (10, 10, 6)
    ref = np.zeros(shape, np.int16)
    ref[2:5, 2:5, 1:4] = 1
    pred = np.zeros(shape, np.int16)
    pred[6:8, 6:8, 2:4] = 2  # class 1 missed, class 2 predicted but absent
    m = case_metrics(pred, ref, [1, 2, 3], (1.0, 1.0, 1.0))
    assert m["1"]["Dice"] == 0.0 and math.isnan(m["1"]["HD95"])  # MONAI: Dice 0, HD inf
    assert m["2"]["Dice"] == 0.0 and math.isnan(m["2"]["HD95"])  # nnU-Net counts false positives
    assert math.isnan(m["3"]["Dice"]) and math.isnan(m["3"]["HD95"])  # both empty: undefined
    assert m["1"]["FN"] == 27 and m["2"]["FP"] == 8 and m["1"]["n_ref"] == 27
    summary = ft.summarize([{"case_id": "x", "metrics": m}], {0: "bg", 1: "a", 2: "b", 3: "c"})
    assert summary["mean"]["1"]["n_defined_HD95"] == 0 and math.isnan(summary["mean"]["3"]["Dice"])
    ft.write_json_atomic(tmp_path / "s.json", summary)  # strict JSON: NaN is written as null
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["mean"]["3"]["Dice"] is None and back["metric_per_case"][0]["metrics"]["1"]["Dice"] == 0.0
