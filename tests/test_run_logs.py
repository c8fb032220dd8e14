"""Run logs: a timestamp on every JSON line, optional TensorBoard scalars (`--tensorboard`) equal to log.jsonl,
and a one-line error naming the extra when tensorboard is not installed."""
from __future__ import annotations

import json
import time

import pytest

from macl import cli, extras
from macl.data import PhantomConfig, write_phantom_dataset

TINY = ["--patch-size", "32", "--batch-size", "4", "--base-width", "4", "--depth", "2", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=3, shape=(32, 32, 8), seed=2))


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_every_log_line_has_a_timestamp(data, tmp_path):
    t0 = time.time()
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "3", *TINY]) == 0
    t1 = time.time()
    lines = _lines(run / "log.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    times = [r["time"] for r in lines]
    assert all(t0 <= t <= t1 for t in times) and times == sorted(times)
    assert all(t0 - 1 <= e["time"] <= t1 + 1 for e in _lines(run / "events.jsonl"))


def test_tensorboard_missing_is_one_line_naming_the_extra(data, tmp_path, capsys, monkeypatch):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "1", "--tensorboard",
                     *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['macl: error: --tensorboard needs the tensorboard extra (missing: tensorboard): '
                   'pip install "macl[tensorboard]"']
    assert not (run / "log.jsonl").exists()   # refused before training


def test_tensorboard_scalars_equal_the_json_log(data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install \"macl[tensorboard]\")")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "3", "--tensorboard",
                     *TINY]) == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("pretrain/loss")]
    want = [(r["step"], r["loss"]) for r in _lines(run / "log.jsonl")]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want))
