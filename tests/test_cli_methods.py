"""`macl pretrain --method gcl` and `macl train-semi --method arco` end to end on tiny phantoms: run,
checkpoint, resume (issue 6)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset

TINY = ["--patch-size", "32", "--batch-size", "4", "--base-width", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=6, shape=(32, 32, 16), seed=3))


def _log_steps(run: Path) -> list:
    return [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


def test_pretrain_gcl_with_csv_meta_labels_checkpoints_and_resumes(data, tmp_path, capsys):
    ids = sorted(p.name.split("_0000")[0] for p in (Path(data) / "imagesTr").glob("*_0000.nii.gz"))
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "site"])
        w.writerows([[cid, "A" if i % 2 else "B"] for i, cid in enumerate(ids)])
    run = tmp_path / "gcl"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--method", "gcl", "--meta-csv", str(meta),
                     "--set", "method.meta_labels=['position','volume','site']", "--steps", "2",
                     "--set", "optim.min_lr=0.01",  # a constant lr: the resume below may extend the run
                     "--checkpoint-every", "1", "--no-progress", *TINY]) == 0
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["pretrain"]["method"]["name"] == "gcl" and resolved["data"]["meta_csv"] == str(meta)
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert {"L_img_site", "L_img_volume", "L_img_position"} <= set(first), sorted(first)
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--steps", "3",
                     "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _log_steps(run) == [1, 2, 3]
    weights = torch.load(run / "pretrained_weights.pt", weights_only=True)
    assert weights["step"] == 3 and any(k.startswith("encoder.") for k in weights["state_dict"])


def test_train_semi_arco_runs_checkpoints_and_resumes(data, tmp_path, capsys):
    run = tmp_path / "arco"
    args = ["train-semi", "--data", str(data), "--out", str(run), "--method", "arco", "--sampler", "sg",
            "--labels-fraction", "0.5", "--patch-size", "32", "--batch-size", "2", "--threads", "1", "--no-progress",
            "--set", "net={'dims': 2, 'base_width': 4, 'depth': 3}", "--set", "checkpoint_every=2"]
    assert cli.main(args + ["--steps", "2", "--no-evaluate"]) == 0
    ckpts = sorted(p.name for p in run.glob("*.pt"))
    assert ckpts, "no checkpoint written"
    capsys.readouterr()
    assert cli.main(args + ["--steps", "2"]) == 0        # the same command again: continues, then evaluates
    out = capsys.readouterr().out
    assert "ARCO (sg sampler) done" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_cases"] >= 1


def test_train_semi_bad_sampler_is_a_usage_error(data, tmp_path):
    assert cli.main(["train-semi", "--data", str(data), "--out", str(tmp_path / "x"), "--sampler", "magic"]) == 2
    assert not (tmp_path / "x").exists()
