"""Multi-channel data and declared splits (issue 14).

- a two-channel nnU-Net data set pre-trains on both channels and fine-tunes from that run end to end, with the
  held-out cases taken from its splits_final.json;
- an explicit channel choice at pre-training is followed by fine-tuning;
- a one-channel pre-training fine-tuned on two-channel data stops with one line saying what to do;
- a MONAI datalist's `validation` list becomes the test split.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset
from macl.data import channels as chan
from macl.data.errors import DataError
from macl.data.split_files import declared_test_cases, open_with_split

PRE = ["--patch-size", "32", "--batch-size", "4", "--base-width", "4", "--depth", "2", "--device", "cpu",
       "--no-progress", "--steps", "2"]
FT = ["--steps", "2", "--batch-size", "2", "--patch-size", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    root = write_phantom_dataset(tmp_path_factory.mktemp("ds2") / "Dataset002_Two",
                                 PhantomConfig(n_subjects=5, shape=(32, 32, 8), n_channels=2, seed=4))
    folds = [{"train": ["phantom_000", "phantom_001", "phantom_002", "phantom_003"], "val": ["phantom_004"]},
             {"train": ["phantom_001", "phantom_002", "phantom_003", "phantom_004"], "val": ["phantom_000"]}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    return root


@pytest.fixture(scope="module")
def one_channel(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds1") / "Dataset001_One",
                                 PhantomConfig(n_subjects=3, shape=(32, 32, 8), n_channels=1, seed=6))


def _weights_in_channels(run):
    w = torch.load(run / "pretrained_weights.pt", weights_only=True)
    return w["net"]["in_channels"], next(t for k, t in w["state_dict"].items() if t.dim() == 4).shape[1]


@pytest.mark.slow
def test_two_channel_nnunet_pretrains_and_finetunes_end_to_end(two_channel, tmp_path):
    assert sorted(p.name for p in (two_channel / "imagesTr").iterdir())[:2] == ["phantom_000_0000.nii.gz",
                                                                              "phantom_000_0001.nii.gz"]
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--data", str(two_channel), "--out", str(pre), *PRE]) == 0
    assert _weights_in_channels(pre) == (2, 2)            # both channels, not channel 0
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(two_channel), "--out", str(ft), "--pretrained", str(pre), *FT]) == 0
    saved = json.loads((ft / "finetune_config.json").read_text())["config"]
    assert saved["channels"] is None                     # all channels, as the pre-training
    loaded = json.loads((ft / "pretrained_load.json").read_text())["loaded"]
    assert "encoder.stages.0.0.conv.weight" in loaded    # the 2-channel first conv carried over
    split = json.loads((ft / "split.json").read_text())
    assert split["test"] == ["phantom_004"]              # splits_final.json fold 0, not a random 20 %
    summary = json.loads((ft / "summary.json").read_text())
    assert [c["case_id"] for c in summary["metric_per_case"]] == ["phantom_004"]


@pytest.mark.slow
def test_fine_tuning_follows_an_explicit_channel_choice(two_channel, tmp_path):
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--data", str(two_channel), "--out", str(pre), "--channels", "1", *PRE]) == 0
    assert _weights_in_channels(pre) == (1, 1)
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(two_channel), "--out", str(ft), "--pretrained", str(pre), *FT,
                     "--no-evaluate"]) == 0
    assert json.loads((ft / "finetune_config.json").read_text())["config"]["channels"] == [1]
    model = torch.load(ft / "model_final.pt", weights_only=True)
    assert next(t for t in model.values() if t.dim() == 4).shape[1] == 1


@pytest.mark.slow
def test_one_channel_pretraining_on_two_channel_data_says_what_to_do(one_channel, two_channel, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--data", str(one_channel), "--out", str(pre), *PRE]) == 0
    capsys.readouterr()
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(two_channel), "--out", str(ft), "--pretrained", str(pre), *FT]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("macl: error: the pre-trained network")
    assert "takes 1 input channel(s)" in err[0] and "--channels 0" in err[0] and "pre-train on this data's 2" in err[0]
    assert not ft.exists()                                # refused before the run folder was made
    # and doing what it says works
    assert cli.main(["finetune", "--data", str(two_channel), "--out", str(ft), "--pretrained", str(pre), *FT,
                     "--channels", "0", "--no-evaluate"]) == 0


def test_datalist_validation_list_is_the_test_split(two_channel, tmp_path):
    def entry(cid):
        return {"image": [str(two_channel / "imagesTr" / f"{cid}_000{c}.nii.gz") for c in (0, 1)],
                "label": str(two_channel / "labelsTr" / f"{cid}.nii.gz")}
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [entry(f"phantom_00{i}") for i in range(4)],
                              "validation": [entry("phantom_004")]}))
    index = open_with_split(dl)
    assert declared_test_cases(index) == ["phantom_004_0000"]
    assert len(index.cases) == 5 and index.by_id("phantom_004_0000").label is not None
    dl.write_text(json.dumps({"training": [entry(f"phantom_00{i}") for i in range(4)]}))
    assert declared_test_cases(open_with_split(dl)) is None


def test_splits_final_errors_name_the_problem(two_channel, tmp_path):
    assert declared_test_cases(open_with_split(two_channel, fold=1)) == ["phantom_000"]
    with pytest.raises(DataError, match="fold 5"):
        open_with_split(two_channel, fold=5)
    bad = tmp_path / "Dataset003"
    import shutil
    shutil.copytree(two_channel, bad)
    (bad / "splits_final.json").write_text(json.dumps([{"train": [], "val": ["nobody"]}]))
    with pytest.raises(DataError, match="nobody"):
        open_with_split(bad)


def test_channel_choices():
    img = np.arange(4 * 2 * 2).reshape(4, 2, 2)
    assert chan.select(img, None) is img
    assert np.array_equal(chan.select(img, [1, 2]), img[1:3]) and np.shares_memory(chan.select(img, [1, 2]), img)
    assert np.array_equal(chan.select(img, [3, 0]), img[[3, 0]])
    assert chan.count(None, 4) == 4 and chan.count(2, 4) == 1
    with pytest.raises(ValueError, match="channel 4 out of range"):
        chan.check([4], 4)
    with pytest.raises(ValueError, match="distinct"):
        chan.as_channels([1, 1])
