"""Issue 22 item 8: SIGTERM is handled like SIGINT.

A pre-training or fine-tuning run sent SIGTERM finishes its current step, checkpoints it, records an
"interrupted" event and exits 143; resuming gives exactly the weights of an uninterrupted run. Tiny runs in a
subprocess (phantoms 32 x 32 x 8, width 4, depth 2, one thread).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from macl.data import PhantomConfig, write_phantom_dataset

REPO = Path(__file__).resolve().parent.parent
PRE = ["--patch-size", "32", "--batch-size", "2", "--base-width", "4", "--depth", "2", "--device", "cpu",
       "--threads", "1", "--no-progress", "--checkpoint-every", "1000"]
FT = ["--batch-size", "2", "--patch-size", "16", "--base-width", "4", "--depth", "2", "--device", "cpu",
      "--threads", "1", "--no-progress", "--checkpoint-every", "1000", "--set", "log_every=1", "--no-evaluate"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=4, shape=(32, 32, 8), seed=5))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _macl(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "macl.cli", *map(str, args)], env=_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def _term_after(args, log: Path, lines: int) -> subprocess.CompletedProcess:
    """Start `macl ARGS`, send SIGTERM once `log` holds `lines` lines, wait for the exit."""
    proc = subprocess.Popen([sys.executable, "-m", "macl.cli", *map(str, args)], env=_env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (log.is_file() and len(log.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240, "the run did not start logging"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _interrupted(run: Path) -> dict:
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "interrupted")


def test_sigterm_during_pretraining_checkpoints_the_step_and_resumes_exactly(data, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = ["pretrain", "--data", data, "--out", run, "--steps", "16", *PRE]
    res = _term_after(args, run / "log.jsonl", 3)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    step = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert 3 <= step < 16 and not (run / "checkpoints" / "final.pt").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == step  # no step lost: the log and checkpoint agree
    assert f"macl: interrupted by SIGTERM after step {step}" in res.stderr
    event = _interrupted(run)
    assert event["signal"] == "SIGTERM" and event["step"] == step
    again = _macl(*args, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert _macl("pretrain", "--data", data, "--out", ref, "--steps", "16", *PRE).returncode == 0
    a = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_finetuning_checkpoints_the_step_and_resumes_exactly(data, tmp_path):
    run, ref = tmp_path / "ft", tmp_path / "ref"
    args = ["finetune", "--data", data, "--out", run, "--steps", "16", *FT]
    res = _term_after(args, run / "finetune_log.jsonl", 3)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    step = torch.load(run / "checkpoint_latest.pt", weights_only=True)["step"]
    assert 3 <= step < 16 and not (run / "model_final.pt").exists()
    assert _interrupted(run)["step"] == step
    again = _macl(*args)
    assert again.returncode == 0, again.stderr
    assert _macl("finetune", "--data", data, "--out", ref, "--steps", "16", *FT).returncode == 0
    a = torch.load(run / "model_final.pt", weights_only=True)
    b = torch.load(ref / "model_final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(ln)["step"] for ln in (run / "finetune_log.jsonl").read_text().splitlines()] == \
        list(range(1, 17))


def test_sigterm_outside_training_is_an_interrupted_event(tmp_path, monkeypatch, capsys):
    """SIGTERM while data load (no training loop yet): KeyboardInterrupt, an event, exit 143."""
    from macl import cli
    out = tmp_path / "r"

    def slow(args, log, bars):
        out.mkdir(exist_ok=True)
        (out / "x").write_text("x")  # the event log writes once the folder holds something
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0
    monkeypatch.setattr(cli, "cmd_pretrain", slow)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), slow))
    assert cli.main(["pretrain", "--data", str(tmp_path), "--out", str(out), "--no-progress"]) == 143
    assert "macl: interrupted by SIGTERM" in capsys.readouterr().err
    assert _interrupted(out)["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def _with(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["pretrain"].set_defaults(func=func)
    return parser
