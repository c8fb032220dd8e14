"""Issue 13 through the command line: every failure is one line and leaves the run folder consistent.

Tiny runs (phantoms, patch 16, depth 2, width 4, batch 2), in-process (`cli.main`) where that tests the same
thing; the concurrency test needs a second process. Items: (1) a declared class absent from every test case,
(2) --labels-fraction 0, (3) a failed command keeps the run's settings, (4) two runs into one folder,
(5) a partial log line, (6) a damaged latest.pt, (7) bad label values, (9) a full disk (and stale temporary
files), (11) settings of the wrong type and YAML; the fault-injection test truncates latest.pt, appends half a
JSON line and fills the disk at start, mid-run and during a checkpoint, and checks that the rerun's final
weights equal an uninterrupted run's."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from macl import cli
from macl.run import files, folder as runfolder
from macl.data import PhantomConfig, write_phantom_dataset

REPO = Path(__file__).resolve().parent.parent
# one CPU thread: on a shared machine torch's default (a thread per core) is many times slower at these sizes
TINY = ["--patch-size", "32", "--batch-size", "2", "--base-width", "4", "--depth", "2", "--device", "cpu",
        "--threads", "1", "--no-progress"]
FT = ["--steps", "2", "--batch-size", "2", "--patch-size", "16", "--base-width", "4", "--depth", "2",
      "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`--threads 1` sets torch's process-wide thread count: restore it for the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four labelled phantoms, 32 x 32 x 8 (MSD / nnU-Net layout)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=4, shape=(32, 32, 8), seed=5))


def _errors(err: str) -> list:
    return [ln for ln in err.splitlines() if ln.startswith("macl: error:")]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = _errors(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(run: Path) -> dict:
    """Every file of a run folder (but the event log, which records the failed attempt) and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "events.jsonl"}


def _steps(log: Path) -> list:
    return [json.loads(ln)["step"] for ln in log.read_text().splitlines()]


def _pretrain(data, run, *extra, steps=6):
    return cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", str(steps),
                     "--checkpoint-every", "2", *TINY, *extra])


def _model(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ item 1
def test_finetune_with_a_declared_but_absent_class_exits_0_and_says_not_evaluable(data, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"]["tumour"] = 5
    (ds / "dataset.json").write_text(json.dumps(meta))
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(ds), "--out", str(ft), *FT]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("tumour"))
    assert "not evaluable" in row
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["not_evaluable"] == {"5": "tumour"} and summary["mean"]["5"]["n_ref"] == 0
    assert cli.main(["evaluate", "--run", str(ft), "--data", str(ds), "--no-progress"]) == 0  # table again, exit 0
    assert "not evaluable" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("command", ["finetune", "train-semi"])
def test_labels_fraction_zero_is_a_clear_error(data, tmp_path, capsys, command):
    run = tmp_path / "r"
    args = [command, "--data", str(data), "--out", str(run), "--labels-fraction", "0", "--steps", "1",
            "--no-progress"]
    assert cli.main(args) == 1
    assert "labels_fraction must be in (0, 1], got 0.0; 0 labels cannot train" in _one_error(capsys)
    assert not run.exists()


# ------------------------------------------------------------------------------------------ item 3
def test_a_failed_command_keeps_the_runs_settings(data, tmp_path, capsys):
    run = tmp_path / "pre"
    assert _pretrain(data, run, "--set", "optim.min_lr=0.01", steps=2) == 0  # constant lr: --steps may grow
    before = _files(run)
    if not torch.cuda.is_available():
        assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--device", "cuda",
                         "--no-progress"]) == 1
        assert "train.device is 'cuda' but CUDA is not available" in _one_error(capsys)
        assert _files(run) == before
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--base-width", "8",
                     "--no-progress"]) == 1
    assert "net.base_width 4 -> 8" in _one_error(capsys) and _files(run) == before
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--steps", "3",
                     "--no-progress"]) == 0  # a plain resume still works
    assert _steps(run / "log.jsonl") == [1, 2, 3]

    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(data), "--out", str(ft), *FT]) == 0
    capsys.readouterr()
    before = _files(ft)
    assert cli.main(["finetune", "--data", str(data), "--out", str(ft), *FT, "--base-width", "8"]) == 1
    assert "net.base_width 4 -> 8" in _one_error(capsys) and _files(ft) == before
    assert cli.main(["evaluate", "--run", str(ft), "--data", str(data), "--no-progress"]) == 0


# ------------------------------------------------------------------------------------------ item 4
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_pretrains_into_one_folder_one_runs_the_other_names_the_lock(data, tmp_path, capsys):
    run = tmp_path / "shared"
    args = ["pretrain", "--data", str(data), "--out", str(run), "--steps", "6", "--checkpoint-every", "2", *TINY]
    first = subprocess.Popen([sys.executable, "-m", "macl.cli", *args], env=_env(), cwd=str(REPO),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while (runfolder.read_lock(run) or {}).get("pid") != first.pid:
        assert first.poll() is None and time.time() - t0 < 120, "the first run did not take the lock"
        time.sleep(0.02)
    # the second run (other settings) is refused at once and writes nothing
    assert cli.main(args + ["--base-width", "8"]) == 1
    line = _one_error(capsys)
    assert str(run / ".macl.lock") in line and f"in use by pid {first.pid} on host {socket.gethostname()}" in line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["pretrain"]["net"]["base_width"] == 4 and _steps(run / "log.jsonl") == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "checkpoints" / "final.pt", weights_only=True)["config"]["net"]["base_width"] == 4
    assert not (run / ".macl.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(data, tmp_path, capsys):
    run = tmp_path / "stale"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".macl.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "pretrain"}))
    assert _pretrain(data, run, steps=1) == 0
    assert f"taking over the stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (run / ".macl.lock").exists() and (run / "checkpoints" / "final.pt").is_file()


# ------------------------------------------------------------------------------------------ items 5 and 6
def test_finetune_resume_drops_a_partial_log_line_and_a_damaged_checkpoint_is_named(data, tmp_path, capsys):
    ft = tmp_path / "ft"
    base = ["finetune", "--data", str(data), "--out", str(ft), "--set", "log_every=1", "--checkpoint-every", "2",
            "--set", "min_lr=0.0005", *FT[2:]]  # FT without its --steps; a constant lr lets a rerun add steps
    assert cli.main(base + ["--steps", "2"]) == 0
    log = ft / "finetune_log.jsonl"
    with open(log, "a") as fh:
        fh.write('{"step": 3, "loss": 0.')  # power loss mid-line
    capsys.readouterr()
    assert cli.main(base + ["--steps", "4"]) == 0
    assert f"{log}: dropped a partial last line" in capsys.readouterr().err
    assert _steps(log) == [1, 2, 3, 4]
    ckpt = ft / "checkpoint_latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = _files(ft)
    assert cli.main(base + ["--steps", "6"]) == 1
    line = _one_error(capsys)
    assert f"{ckpt}: cannot load checkpoint (truncated or not a checkpoint)" in line and "weights_only=False" not in line
    assert _files(ft) == before


# ------------------------------------------------------------------------------------------ item 7
def _nifti_folder(root: Path, labels: list) -> Path:
    (root / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, lab in enumerate(labels):
        img = rng.normal(size=(32, 32, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.int16), np.eye(4)), str(root / "labels" / f"c{i}.nii.gz"))
    return root


def test_negative_and_255_label_values_are_refused_before_training(tmp_path, capsys):
    good = np.zeros((32, 32, 8), np.int16)
    good[8:20, 8:20] = 1
    neg = good.copy()
    neg[0, 0, 0] = -1
    folder = _nifti_folder(tmp_path / "neg", [good, good, good, neg])
    assert cli.main(["finetune", "--data", str(folder), "--out", str(tmp_path / "r1"), *FT]) == 1
    assert f"{folder / 'labels' / 'c3.nii.gz'}: negative label values [-1]" in _one_error(capsys)
    assert not (tmp_path / "r1").exists()
    assert cli.main(["finetune", "--data", str(folder), "--out", str(tmp_path / "r2"), "--skip-bad", *FT]) == 0
    assert "c3" in capsys.readouterr().err  # skipped with a warning, no crash in the one-hot
    ignore = good.copy()
    ignore[0, 0, :] = 255
    folder = _nifti_folder(tmp_path / "ignore", [good, good, good, ignore])
    assert cli.main(["finetune", "--data", str(folder), "--out", str(tmp_path / "r3"), *FT]) == 1
    assert "label values [0, 1, 255] skip [2, 3" in _one_error(capsys)  # not 256 classes
    assert not (tmp_path / "r3").exists()


# ------------------------------------------------------------------------------------------ item 9
_REAL_WRITE = files._write_all


def _full_disk(monkeypatch, when):
    """Writes into a file for which `when(name, fh)` holds raise ENOSPC (a patched writer)."""
    real = _REAL_WRITE

    def write(fh, data):
        if when(Path(str(getattr(fh, "name", ""))).name, fh):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)
    monkeypatch.setattr(files, "_write_all", write)


def test_a_full_disk_at_start_is_one_line_naming_the_file_and_leaves_nothing(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "full"
    _full_disk(monkeypatch, lambda name, fh: True)  # nothing can be written, not even the event log
    assert _pretrain(data, run, steps=1) == 1
    assert _one_error(capsys) == f"macl: error: {run / '.macl.lock'}: no space left on device"
    assert not run.exists()
    _full_disk(monkeypatch, lambda name, fh: name.startswith("resolved_config.json"))
    assert _pretrain(data, run, steps=1) == 1
    assert _one_error(capsys) == f"macl: error: {run / 'resolved_config.json'}: no space left on device"
    assert not run.exists()
    monkeypatch.setattr(files, "_write_all", _REAL_WRITE)
    assert _pretrain(data, run, steps=1) == 0
    capsys.readouterr()
    before, events = _files(run), (run / "events.jsonl").read_bytes()
    _full_disk(monkeypatch, lambda name, fh: True)  # a full disk under a used folder: the error event cannot go in
    assert _pretrain(data, run, "--resume", "auto", steps=2) == 1
    assert _one_error(capsys) == f"macl: error: {run / '.macl.lock'}: no space left on device"
    assert _files(run) == before and (run / "events.jsonl").read_bytes() == events  # no half line either


# ------------------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
    (["--lr", "inf"], "optim.lr must be a finite number, got 'inf'"),
    (["--lr", "nan"], "optim.lr must be a finite number, got 'nan'"),
    (["--set", "net.base_width=4.5"], "net.base_width must be an integer, got 4.5"),
    (["--set", "train.steps=2.7"], "train.steps must be an integer, got 2.7"),
    (["--set", "train.deterministic=maybe"], "train.deterministic must be true or false, got 'maybe'"),
    (["--set", "data.batch_size=two"], "data.batch_size must be an integer, got 'two'"),
])
def test_settings_of_the_wrong_type_name_the_field(data, tmp_path, capsys, args, message):
    run = tmp_path / "r"
    assert _pretrain(data, run, *args, steps=1) == 1
    assert _one_error(capsys) == f"macl: error: {message}"
    assert not run.exists()


def test_yaml_config_needs_the_extra_or_works(data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 1\n")
    run = tmp_path / "r"
    status = _pretrain(data, run, "--config", str(cfg), steps=1)
    try:
        import yaml  # noqa: F401
    except ImportError:
        assert status == 1
        assert _one_error(capsys) == (f"macl: error: {cfg}: reading YAML needs PyYAML: pip install 'macl[yaml]' "
                                      f"(or pyyaml), or use a .toml / .json file")
        assert not run.exists()
    else:
        assert status == 0


# ------------------------------------------------------------------------------------------ fault injection
@pytest.mark.slow
def test_faults_at_start_mid_run_and_in_a_checkpoint_then_the_same_command_finishes(data, tmp_path, capsys,
                                                                                   monkeypatch):
    """Each fault: one line naming the file, the last good checkpoint kept; rerunning the same command
    (--resume auto) finishes with the weights of an uninterrupted run."""
    ref = tmp_path / "ref"
    assert _pretrain(data, ref, "--resume", "auto") == 0
    want = _model(ref / "checkpoints" / "final.pt")
    calls = {}

    def nth(match, n):  # writing the n-th file opened under a name that satisfies `match` fails
        def when(name, fh):
            if match(name):
                opened = calls.setdefault(match, [])
                if not opened or opened[-1] is not fh:  # torch.save writes one file in many pieces
                    opened.append(fh)
                return len(opened) == n
            return False
        return when

    def nth_line(name, n):  # the n-th append to `name` fails (each log line is one write)
        def when(fname, fh):
            if fname == name:
                calls[name] = calls.get(name, 0) + 1
                return calls[name] == n
            return False
        return when

    cases = {"start": (lambda name, fh: True, ".macl.lock", None),
             "mid-run": (nth_line("log.jsonl", 3), "log.jsonl", 2),  # the append of step 3's line
             "checkpoint": (nth(lambda n: n.startswith("latest.pt.tmp"), 2), "checkpoints/latest.pt", 2)}  # step 4
    for moment, (when, victim, kept_step) in cases.items():
        run = tmp_path / moment
        calls.clear()
        capsys.readouterr()
        with monkeypatch.context() as m:
            _full_disk(m, when)
            assert _pretrain(data, run, "--resume", "auto") == 1, moment
        assert _one_error(capsys) == f"macl: error: {run / victim}: no space left on device", moment
        if kept_step is None:
            assert not run.exists()
        else:
            assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == kept_step
            assert not [p for p in run.rglob("*") if ".tmp" in p.name]  # no partial file left behind
        if moment == "mid-run":  # and worse: a truncated latest.pt, half a JSON line at the end of the log
            latest = run / "checkpoints" / "latest.pt"
            latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
            with open(run / "log.jsonl", "a") as fh:
                fh.write('{"step": 3, "L_g": 1.2')
            (run / "checkpoints" / f"step_0000002.pt.tmp{2 ** 22 + 1}").write_bytes(b"half")  # a SIGKILLed write
        assert _pretrain(data, run, "--resume", "auto") == 0, moment
        err = capsys.readouterr().err
        if moment == "mid-run":
            assert "latest.pt: cannot load checkpoint (truncated" in err and "resuming from" in err
            assert "step_0000002.pt" in err and "dropped a partial last line" in err
            assert not list((run / "checkpoints").glob("*.tmp*"))
        _assert_same_weights(_model(run / "checkpoints" / "final.pt"), want)
        assert _steps(run / "log.jsonl") == [1, 2, 3, 4, 5, 6], moment


def test_a_summary_with_null_dice_prints_not_evaluable():
    """The reported crash: summary.json holds null (NaN) for a class undefined in every case -> float(None)."""
    from macl.workflow import dice_table, format_summary
    summary = {"mean": {"1": {"Dice": 0.5, "HD95": 2.0}, "5": {"Dice": None, "HD95": None}},
               "foreground_mean": {"Dice": 0.5, "HD95": None}, "n_cases": 1,
               "class_names": {"0": "background", "1": "organ", "5": "tumour"}}
    rows = dice_table(summary)
    assert rows[0] == ("organ", 0.5, 2.0) and rows[1][0] == "tumour" and rows[1][1] != rows[1][1]  # NaN
    text = format_summary(summary)
    assert "tumour          not evaluable" in text and "mean             0.500       n/a" in text
