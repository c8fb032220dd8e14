"""Pre-training under torchrun (macl.parallel): 2 gloo ranks on CPU.

- `macl pretrain` launched by `python -m torch.distributed.run --nproc_per_node 2` on generated phantoms writes
  one set of checkpoints, one log line per step and one event log, resumes exactly at the same world size, and
  resumes on another world size;
- `macl.train.pretrain` on 2 ranks, each fed its half of fixed global batches, logs the losses of one process
  fed the whole batches and ends with the same parameters (cross-rank negatives + DDP's gradient average);
- the plumbing's errors: uneven shards, SyncBatchNorm on CPU, a malformed torchrun environment.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train_dist_worker as tw
from macl.data import PhantomConfig, write_phantom_dataset
from macl.parallel import SINGLE, World, env_world, init_from_env, wrap_ddp
from macl.train import load_checkpoint, pretrain

REPO = Path(__file__).resolve().parent.parent
TINY = ["--patch-size", "32", "--batch-size", "4", "--base-width", "4", "--depth", "2", "--device", "cpu",
        "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _macl(*args, nproc=None, timeout=300):
    """`macl ARGS` as one process, or under `torchrun --standalone --nproc_per_node nproc`."""
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, *launch, "-m", "macl.cli", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res


def _descendants(pid: int) -> list:
    """Every live descendant of process `pid` (Linux /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, pp in parent.items() if pp == current]
        out += kids
        todo += kids
    return out


def _log(run: Path) -> list:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


def _rewind(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as if it had been killed right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    ck = dst / "checkpoints"
    shutil.copy(ck / f"step_{step:07d}.pt", ck / "latest.pt")
    (ck / "final.pt").unlink()
    (dst / "pretrained_weights.pt").unlink()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=4, shape=(32, 32, 8), seed=5))


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("torchrun") / "run"
    res = _macl("pretrain", "--data", data, "--out", run, "--steps", 4, "--checkpoint-every", 2, *TINY, nproc=2)
    return run, res


def test_two_ranks_write_one_set_of_files(two_rank_run):
    run, res = two_rank_run
    assert res.stdout.count("pre-training done") == 1  # rank 0 reports, rank 1 stays quiet
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final.pt", "latest.pt", "step_0000002.pt"]
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4]
    events = [json.loads(ln)["event"] for ln in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert json.loads((run / "resolved_config.json").read_text())["world_size"] == 2
    ckpt = load_checkpoint(str(run / "checkpoints" / "final.pt"))
    assert ckpt["step"] == 4 and not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    assert torch.load(run / "pretrained_weights.pt", weights_only=True)["step"] == 4


def test_no_per_rank_ddp_warning(two_rank_run):
    """DDP is built with static_graph (unused parameters recorded once), not find_unused_parameters=True, which
    warned on every rank of every run (issue 14)."""
    _, res = two_rank_run
    assert "find_unused_parameters" not in res.stderr and "reducer.cpp" not in res.stderr, res.stderr[-2000:]


def test_resume_on_the_same_world_size_is_exact(two_rank_run, tmp_path):
    run, _ = two_rank_run
    again = tmp_path / "again"
    _rewind(run, again, 2)
    res = _macl("pretrain", "--data", json.loads((run / "resolved_config.json").read_text())["data"]["path"],
                "--out", again, "--resume", "auto", *TINY, nproc=2)
    assert "resumed from" in res.stdout
    want, got = _log(run), _log(again)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want[2:], got[2:]):
        for term in ("L_g", "L_d", "L_ER", "loss"):
            assert b[term] == pytest.approx(a[term], rel=1e-6, abs=1e-7), (a["step"], term)


def test_resume_on_another_world_size(two_rank_run, tmp_path):
    run, _ = two_rank_run
    single = tmp_path / "single"
    _rewind(run, single, 2)
    data = json.loads((run / "resolved_config.json").read_text())["data"]["path"]
    res = _macl("pretrain", "--data", data, "--out", single, "--resume", "auto", *TINY)  # one process
    assert "resumed from" in res.stdout
    assert [r["step"] for r in _log(single)] == [1, 2, 3, 4]
    assert load_checkpoint(str(single / "checkpoints" / "final.pt"))["step"] == 4


def test_two_ranks_train_like_one_process_on_the_union_batch(tmp_path):
    """Same global batches: the logged terms (averaged over ranks) and the final parameters match one process."""
    mp.spawn(tw.worker, args=(2, _free_port(), str(tmp_path / "dist")), nprocs=2, join=True)
    batches = tw.global_batches()
    torch.set_num_threads(1)
    pretrain(tw.config(), lambda start: iter(batches[start:]), str(tmp_path / "single"))
    want, got = _log(tmp_path / "single"), _log(tmp_path / "dist")
    assert [r["step"] for r in got] == list(range(1, tw.STEPS + 1))
    for a, b in zip(want, got):
        for term in ("L_g", "L_d", "L_ER", "loss"):
            assert b[term] == pytest.approx(a[term], rel=2e-5), (a["step"], term)
    p1 = load_checkpoint(str(tmp_path / "single" / "checkpoints" / "final.pt"))["model"]
    p2 = load_checkpoint(str(tmp_path / "dist" / "checkpoints" / "final.pt"))["model"]
    assert p1.keys() == p2.keys()
    for k in p1:
        if p1[k].is_floating_point():
            torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    from macl.methods import build_method
    torch.manual_seed(tw.config().train.seed)  # the parameters both runs started from
    start = build_method(tw.config().net, tw.config().method).state_dict()
    assert max(float((p1[k] - start[k]).abs().max()) for k in p1 if p1[k].is_floating_point()) > 1e-4


def test_local_losses_differ_from_the_global_one():
    """What the equivalence test could not tell apart otherwise: per-rank losses on local negatives differ."""
    from macl.methods import Batch, build_method
    torch.manual_seed(0)
    method = build_method(tw.config().net, tw.config().method)
    batch = tw.global_batches()[0]
    whole = method(Batch.from_any(batch))["L_g"]
    halves = torch.stack([method(Batch.from_any(tw.shard(batch, r, 2)))["L_g"] for r in range(2)]).mean()
    assert abs(float(whole) - float(halves)) > 1e-3


def test_world_size_one_initialises_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_from_env("cpu") is SINGLE and not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
                                          ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2, WORLD_SIZE=2")])
def test_malformed_torchrun_environment(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        env_world()


def test_uneven_shards_and_cpu_syncbatchnorm_are_refused():
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by the world size 2"):
        World(0, 2, 0).shard(5)
    assert World(1, 2, 1).shard(8) == (4, 8)
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        wrap_ddp(torch.nn.BatchNorm1d(3), World(0, 2, 0), torch.device("cpu"), sync_batchnorm=True)


def test_uneven_global_batch_fails_on_the_command_line(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "macl.cli",
           "pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "2", *TINY[:2],
           "--batch-size", "5", *TINY[4:]]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=300)
    assert res.returncode != 0
    assert "data.batch_size 5 is not divisible by the world size 2" in res.stderr
    assert not (tmp_path / "r").exists()  # nothing written


def test_finetune_under_torchrun_writes_once_resumes_and_evaluates(data, tmp_path):
    run = tmp_path / "ft"
    args = ["finetune", "--data", data, "--out", run, "--labels-fraction", "0.5", "--batch-size", 4, "--patch-size",
            32, "--base-width", 4, "--depth", 3, "--device", "cpu", "--checkpoint-every", 2, "--no-progress",
            "--set", "log_every=1", "--set", "min_lr=0.0005"]  # a constant lr: the rerun may add steps (issue 22)
    _macl(*args, "--steps", 2, "--no-evaluate", nproc=2)
    assert json.loads((run / "finetune_config.json").read_text())["world_size"] == 2
    res = _macl(*args, "--steps", 4, nproc=2)        # the same run, longer: continues from step 2, then evaluates
    assert res.stdout.count("fine-tuning done") == 1
    steps = [json.loads(ln)["step"] for ln in (run / "finetune_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert any("resumed" in e.get("message", "") and "at step 2" in e["message"] for e in events)
    assert torch.load(run / "checkpoint_latest.pt", weights_only=True)["step"] == 4
    assert json.loads((run / "summary.json").read_text())["n_cases"] >= 1
    assert not list(run.glob("*.tmp*"))


def test_train_semi_under_torchrun_survives_a_kill_and_resumes(data, tmp_path):
    import signal
    import time
    run = tmp_path / "arco"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "macl.cli",
           "train-semi", "--data", str(data), "--out", str(run), "--method", "arco", "--sampler", "sg",
           "--labels-fraction", "0.5", "--patch-size", "32", "--batch-size", "2", "--steps", "40", "--no-progress",
           "--no-evaluate", "--set", "net={'dims': 2, 'base_width': 4, 'depth': 3}", "--set", "checkpoint_every=3",
           "--set", "log_every=1"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    ckpt = run / "checkpoint_latest.pt"
    deadline = time.time() + 240
    while not ckpt.exists():
        assert proc.poll() is None, f"torchrun ended before its first checkpoint: {proc.stderr.read()}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    for pid in [proc.pid] + _descendants(proc.pid):   # torchrun and both ranks (they run in their own sessions)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    saved = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < saved < 40 and not (run / "model_final.pt").exists()
    _macl(*cmd[cmd.index("train-semi"):], nproc=2)  # the same command again continues from the checkpoint
    steps = [json.loads(ln)["step"] for ln in (run / "semi_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert torch.load(ckpt, weights_only=True)["step"] == 40 and (run / "model_final.pt").exists()
    assert json.loads((run / "semi_config.json").read_text())["world_size"] == 2
