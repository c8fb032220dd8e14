"""Issue 22 item 2: a resume cannot mix settings.

Every setting that changes a run's trajectory, changed on ``--resume`` (pre-training) or on a rerun (fine-tuning),
is refused with one line naming it and both values, and the run folder stays byte-identical (every file hashed;
``events.jsonl`` only gains the lines recording the refused command). Safe settings are accepted and recorded in
the event log and in ``resolved_config.json``'s ``resumes``. Tiny runs (phantoms 32 x 32 x 8, width 4, depth 2).
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from macl import cli
from macl.data import PhantomConfig, write_phantom_dataset
from macl.run import resume_guard

TINY = ["--patch-size", "32", "--batch-size", "2", "--base-width", "4", "--depth", "2", "--device", "cpu",
        "--threads", "1", "--no-progress"]
FT = ["--steps", "2", "--batch-size", "2", "--patch-size", "16", "--device", "cpu", "--threads", "1",
      "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=4, shape=(32, 32, 8), seed=5))


@pytest.fixture(scope="module")
def pre(data, tmp_path_factory):
    """A finished 2-step pre-training run (cosine lr) with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("pre") / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "2", "--checkpoint-every", "1",
                     *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def ft(data, tmp_path_factory):
    """A finished 2-step fine-tuning run from scratch (width 4, depth 2)."""
    run = tmp_path_factory.mktemp("ft") / "run"
    assert cli.main(["finetune", "--data", str(data), "--out", str(run), "--base-width", "4", "--depth", "2",
                     *FT]) == 0
    return run


def _hashes(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "events.jsonl"}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("macl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _assert_refused_and_untouched(run: Path, argv: list, capsys, setting: str, old: str, new: str) -> None:
    before, events = _hashes(run), (run / "events.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 1
    line = _one_error(capsys)
    # network / method settings are checked against the checkpoint first ("method.preset 'robust' -> 'faithful'")
    assert (f"{setting} {new} " in line and f"the run's {old}" in line) or f"{setting} {old} -> {new}" in line, line
    assert "another --out" in line or "a new --out" in line, line
    assert _hashes(run) == before  # every file byte-identical
    after = (run / "events.jsonl").read_bytes()
    assert after.startswith(events)  # the event log only gained the refused command's lines
    added = [json.loads(ln)["event"] for ln in after[len(events):].decode().splitlines()]
    assert added[0] == "start" and added[-1] == "error" and set(added) <= {"start", "config", "error"}, added


# ---------------------------------------------------------------------------------------------- pre-training
@pytest.mark.parametrize("flags, setting, old, new", [
    (["--batch-size", "4"], "data.batch_size", "2", "4"),
    (["--patch-size", "64"], "data.patch_size", "[32, 32]", "[64, 64]"),
    (["--lr", "0.1"], "optim.lr", "0.01", "0.1"),
    (["--set", "optim.min_lr=0.001"], "optim.min_lr", "0.0", "0.001"),
    (["--steps", "3"], "train.steps", "2", "3"),   # the cosine schedule spans the run's length
    (["--seed", "1"], "train.seed", "0", "1"),
    (["--views", "paper"], "data.views", "'code'", "'paper'"),
    (["--set", "data.crop='centre'"], "data.crop", "'random'", "'centre'"),
    (["--preset", "faithful"], "method.preset", "'robust'", "'faithful'"),
    (["--channels", "0"], "data.channel", "None", "[0]"),
    (["--spacing", "1,1,2"], "preprocess.spacing", "None", "[1.0, 1.0, 2.0]"),
])
def test_pretrain_resume_refuses_each_trajectory_setting(pre, data, capsys, flags, setting, old, new):
    argv = ["pretrain", "--data", str(data), "--out", str(pre), "--resume", "auto", "--no-progress", *flags]
    _assert_refused_and_untouched(pre, argv, capsys, setting, old, new)


def test_pretrain_resume_refuses_other_data(pre, data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    argv = ["pretrain", "--data", str(other), "--out", str(pre), "--resume", "auto", "--no-progress"]
    _assert_refused_and_untouched(pre, argv, capsys, "data.path", repr(str(data)), repr(str(other)))


def test_pretrain_resume_accepts_and_records_safe_settings(pre, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pre, run)
    ckpt = run / "checkpoints"
    shutil.copy(ckpt / "step_0000001.pt", ckpt / "latest.pt")  # as if stopped after step 1
    (ckpt / "final.pt").unlink()
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--checkpoint-every",
                     "5", "--set", "train.log_every=2", "--threads", "1", "--no-progress"]) == 0
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["pretrain"]["train"]["checkpoint_every"] == 5
    assert resolved["resumes"][-1]["step"] == 1
    assert resolved["resumes"][-1]["changes"] == [
        {"setting": "train.checkpoint_every", "old": 1, "new": 5},
        {"setting": "train.log_every", "old": 1, "new": 2}]
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    logged = [e["message"] for e in events if e["event"] == "log" and "changed settings" in e.get("message", "")]
    assert logged and "train.checkpoint_every 1 -> 5" in logged[-1] and "train.log_every 1 -> 2" in logged[-1]
    assert torch.load(ckpt / "final.pt", weights_only=True)["step"] == 2  # the run's own 2 steps


def test_pretrain_steps_extend_when_the_lr_is_constant(data, tmp_path, capsys):
    run = tmp_path / "const"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "2", "--checkpoint-every", "1",
                     "--set", "optim.min_lr=0.01", *TINY]) == 0
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--steps", "3",
                     "--no-progress"]) == 0
    assert json.loads((run / "resolved_config.json").read_text())["resumes"][-1]["changes"] == [
        {"setting": "train.steps", "old": 2, "new": 3}]
    assert torch.load(run / "checkpoints" / "final.pt", weights_only=True)["step"] == 3
    capsys.readouterr()
    # shrinking below the steps already done is refused, constant lr or not
    argv = ["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--steps", "1", "--no-progress"]
    _assert_refused_and_untouched(run, argv, capsys, "train.steps", "3", "1")


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("flags, setting, old, new", [
    (["--batch-size", "3"], "batch_size", "2", "3"),
    (["--patch-size", "32"], "patch_size", "[16, 16]", "[32, 32]"),
    (["--lr", "0.01"], "lr", "0.0005", "0.01"),
    (["--steps", "3"], "steps", "2", "3"),
    (["--seed", "2"], "seed", "0", "2"),
    (["--labels-fraction", "0.5"], "labels_fraction", "None", "0.5"),
    (["--set", "mirror=false"], "mirror", "True", "False"),
    (["--channels", "0"], "channels", "None", "[0]"),
    (["--spacing", "1,1,2"], "preprocess.spacing", "None", "[1.0, 1.0, 2.0]"),
])
def test_finetune_rerun_refuses_each_trajectory_setting(ft, data, capsys, flags, setting, old, new):
    argv = ["finetune", "--data", str(data), "--out", str(ft), *FT, *flags]
    _assert_refused_and_untouched(ft, argv, capsys, setting, old, new)


def test_finetune_rerun_takes_the_runs_settings_and_records_safe_changes(ft, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ft, run)
    # no size flags at all: the run's own (batch 2, patch 16, width 4, depth 2), not the defaults
    assert cli.main(["finetune", "--data", str(data), "--out", str(run), "--checkpoint-every", "1",
                     "--threads", "1", "--no-progress"]) == 0
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["finetune"]["batch_size"] == 2 and resolved["net"]["base_width"] == 4
    assert resolved["resumes"][-1]["changes"] == [{"setting": "checkpoint_every", "old": 200, "new": 1}]
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert any("checkpoint_every 200 -> 1" in e.get("message", "") for e in events if e["event"] == "log")


def test_resume_changes_unit():
    """The comparison itself: unknown keys are trajectory settings; paths compare as real paths."""
    saved = {"a": {"x": 1, "new_thing": 0}, "path": "ds", "steps": 4}
    assert resume_guard.resume_changes("R", saved, {"a": {"x": 1, "new_thing": 0}, "path": "./ds", "steps": 6},
                                       safe=(), steps_key="steps", done_step=4, schedule_fixed=True,
                                       paths=("path",)) == [{"setting": "steps", "old": 4, "new": 6}]
    with pytest.raises(ValueError, match=r"^cannot resume R: a.new_thing 1 differs from the run's 0; "):
        resume_guard.resume_changes("R", saved, {**saved, "a": {"x": 1, "new_thing": 1}}, safe=("a.x",),
                                    steps_key="steps", done_step=4, schedule_fixed=True)


# ---------------------------------------------------------------------------------------------- train-semi
def test_train_semi_rerun_takes_the_checkpoints_settings_and_refuses_changes(data, tmp_path, capsys):
    run = tmp_path / "arco"
    base = ["train-semi", "--data", str(data), "--out", str(run), "--labels-fraction", "0.5", "--patch-size", "32",
            "--threads", "1", "--no-progress", "--no-evaluate", "--set", "net={'dims': 2, 'base_width': 4, 'depth': 3}",
            "--set", "checkpoint_every=1"]
    assert cli.main(base + ["--batch-size", "2", "--steps", "2"]) == 0
    for flags, setting, old, new in ((["--batch-size", "2", "--steps", "3"], "steps", "2", "3"),
                                     (["--batch-size", "3", "--steps", "2"], "batch_size", "2", "3"),
                                     (["--batch-size", "2", "--seed", "4"], "seed", "0", "4")):
        _assert_refused_and_untouched(run, base + flags, capsys, setting, old, new)
    # nothing given but the folder: the checkpoint's settings, not the defaults (batch 4, patch 64, width 32)
    assert cli.main(["train-semi", "--data", str(data), "--out", str(run), "--threads", "1", "--no-progress",
                     "--no-evaluate"]) == 0
