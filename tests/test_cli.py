"""The `macl` command line: pretrain -> finetune -> evaluate on generated phantoms (in-process and as a real
subprocess), --help and --version, one-line errors with a consistent run folder, SIGKILL during training and
during a checkpoint write followed by `--resume auto`, and the demo pipeline at a tiny size."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from macl import __version__, cli
from macl.data import PhantomConfig, write_phantom_dataset

REPO = Path(__file__).resolve().parent.parent
# a tiny network and short runs: every pre-training below takes a few seconds
# 32² at depth 2: the smallest patch at which every MACL term is non-degenerate (macl.settings.geometry)
TINY = ["--patch-size", "32", "--batch-size", "4", "--base-width", "4", "--depth", "2", "--device", "cpu"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _macl(*args, timeout=240):
    """`python -m macl.cli ARGS` in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "macl.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=str(REPO), timeout=timeout)


def _error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("macl: error:")]


def _log_steps(run: Path) -> list:
    return [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six labelled phantoms, 32 x 32 x 16 (MSD / nnU-Net layout)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds",
                                 PhantomConfig(n_subjects=6, shape=(32, 32, 16), seed=3))


# ------------------------------------------------------------------------------------------ help, version
def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"macl {__version__}"
    out = _macl("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"macl {__version__}"


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "demo", "bench"])
def test_help_explains_every_flag(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: macl {command}")
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings:
            assert action.help, f"macl {command} {action.option_strings[0]} has no help text"
            assert action.option_strings[-1] in text
    if command == "pretrain":
        for flag in ("--data", "--out", "--method", "--dims", "--config", "--set", "--resume", "--skip-bad",
                     "--patch-size", "--batch-size", "--steps"):
            assert flag in text


def test_top_level_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("pretrain", "finetune", "evaluate", "demo", "bench"):
        assert command in text


# ------------------------------------------------------------------------------------------ end to end
def test_pretrain_finetune_evaluate_in_process(data, tmp_path, capsys):
    run, ft = tmp_path / "pre", tmp_path / "ft"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "4", "--checkpoint-every", "2",
                     "--no-progress", "--set", "method.threshold=0.2", *TINY]) == 0
    assert "pre-training done: 4 steps" in capsys.readouterr().out
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["data"]["path"] == str(data) and resolved["data"]["batch_size"] == 4
    assert resolved["data"]["patch_size"] == [32, 32] and resolved["preprocess"]["orientation"] == "RAS"
    assert resolved["pretrain"]["method"]["threshold"] == 0.2 and resolved["pretrain"]["net"]["base_width"] == 4
    assert resolved["data_summary"]["n_volumes"] == 6 and resolved["data_summary"]["samples_per_epoch"] == 6 * 16
    assert _log_steps(run) == [1, 2, 3, 4]
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end" and events[-1]["status"] == 0
    weights = torch.load(run / "pretrained_weights.pt", weights_only=True)
    assert weights["step"] == 4 and any(k.startswith("encoder.") for k in weights["state_dict"])

    assert cli.main(["finetune", "--data", str(data), "--out", str(ft), "--pretrained", str(run),
                     "--labels-fraction", "0.5", "--steps", "3", "--batch-size", "2", "--patch-size", "32",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning done" in out and "mean" in out
    loaded = json.loads((ft / "pretrained_load.json").read_text())["loaded"]
    assert sorted(loaded) == sorted(weights["state_dict"])  # every pre-trained tensor went into the U-Net
    split = json.loads((ft / "split.json").read_text())
    assert len(split["labelled"]) == 2 and json.loads((ft / "labelled_cases.json").read_text()) == split["labelled"]
    saved = json.loads((ft / "resolved_config.json").read_text())
    assert saved["net"] == {"dims": 2, "base_width": 4, "depth": 2, "norm": "batch"}  # read from the pre-training run
    assert saved["finetune"]["labels_fraction"] == 0.5 and saved["finetune"]["steps"] == 3
    first = json.loads((ft / "summary.json").read_text())

    (ft / "summary.json").unlink()
    assert cli.main(["evaluate", "--run", str(ft), "--data", str(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    again = json.loads((ft / "summary.json").read_text())
    assert again["n_cases"] == len(split["test"]) and again["mean"] == first["mean"]
    assert f"{again['foreground_mean']['Dice']:.3f}" in out
    assert json.loads((ft / "evaluate_config.json").read_text())["data"] == str(data)


def test_config_file_with_data_section_then_flags_then_set(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[net]\nbase_width = 4\ndepth = 2\n[train]\nsteps = 2\ndevice = "cpu"\n'
                   '[data]\nbatch_size = 4\npatch_size = [32, 32]\ncrop = "centre"\n[preprocess]\nzscore_nonzero = true\n')
    run = tmp_path / "cfg"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--config", str(cfg), "--steps", "3",
                     "--set", "train.steps=2", "--set", "data.batch_size=6", "--no-progress"]) == 0
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["pretrain"]["net"]["base_width"] == 4 and resolved["pretrain"]["train"]["steps"] == 2  # --set wins
    assert resolved["data"]["crop"] == "centre" and resolved["data"]["batch_size"] == 6
    assert resolved["preprocess"]["zscore_nonzero"] is True and _log_steps(run) == [1, 2]


def test_resume_keeps_the_runs_own_settings(data, tmp_path, capsys):
    run = tmp_path / "pcl"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--method", "pcl", "--steps", "2",
                     "--set", "optim.min_lr=0.01", "--checkpoint-every", "1", "--no-progress", *TINY]) == 0
    # no --method, no size flags: the saved settings are used, only the length changes (a constant lr allows it)
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "auto", "--steps", "3",
                     "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "resolved_config.json").read_text())["pretrain"]["method"]["name"] == "pcl"
    assert _log_steps(run) == [1, 2, 3]


def test_subprocess_finetune_from_scratch(data, tmp_path):
    ft = tmp_path / "scratch"
    res = _macl("finetune", "--data", data, "--out", ft, "--labels-fraction", "0.25", "--steps", "2",
                "--batch-size", "2", "--patch-size", "32", "--base-width", "4", "--depth", "3", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    # stderr is a pipe here, not a terminal: no progress bar drawn into it (issue 14)
    assert "from scratch" in res.stdout and "finetune:" not in res.stderr and "\r" not in res.stderr
    assert not (ft / "pretrained_load.json").exists()
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["n_cases"] == 1 and f"{summary['foreground_mean']['Dice']:.3f}" in res.stdout


# ------------------------------------------------------------------------------------------ errors
def test_folder_without_volumes_is_one_line_and_no_run_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _macl("pretrain", "--data", empty, "--out", tmp_path / "run")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"macl: error: {empty}: no NIfTI volumes found (looked for *.nii and *.nii.gz)"]
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_truncated_volume_is_named_and_skip_bad_skips_it(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    victim = bad / "imagesTr" / "phantom_002_0000.nii.gz"
    victim.write_bytes(victim.read_bytes()[:300])
    for command, extra in (("pretrain", ["--steps", "1", *TINY]),
                           ("finetune", ["--steps", "1", "--patch-size", "32", "--base-width", "4", "--depth", "3"])):
        assert cli.main([command, "--data", str(bad), "--out", str(tmp_path / command), "--no-progress", *extra]) == 1
        err = capsys.readouterr().err
        assert len(_error_lines(err)) == 1 and str(victim) in _error_lines(err)[0] and "Traceback" not in err
        assert not (tmp_path / command).exists()  # the run folder is not left half-made
    assert cli.main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "skip"), "--steps", "1", "--skip-bad",
                     "--no-progress", *TINY]) == 0
    assert "skipping case phantom_002" in capsys.readouterr().err
    assert json.loads((tmp_path / "skip" / "resolved_config.json").read_text())["data_summary"]["n_volumes"] == 5


@pytest.mark.parametrize("args, message", [
    (["--set", "method.nope=1"], "unknown key 'nope' in config section 'method'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--set", "data.nope=1"], "unknown key(s) ['nope'] in section 'data'"),
    (["--patch-size", "40"], "not divisible by 2^(depth+decoder_blocks) = 16"),
    (["--patch-size", "64", "--depth", "4"], "L_ER is degenerate. Use a patch of 128x128 at depth 4 or depth 3 at patch 64x64"),
    (["--batch-size", "500"], "batch size 500 is larger than the 96 samples per epoch"),
    (["--resume", "/nowhere/latest.pt"], "checkpoint to resume not found: /nowhere/latest.pt"),
    (["--config", "/nowhere/c.toml"], "config file not found: /nowhere/c.toml"),
])
def test_bad_settings_are_one_line(data, tmp_path, capsys, args, message):
    base = ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    assert cli.main(base + TINY + args) == 1  # a flag given twice: argparse keeps the last
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "nan"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "6", "--lr", "1e30",
                     "--checkpoint-every", "1", "--no-progress", *TINY]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "non-finite loss at step" in err and "last good checkpoint kept" in err
    step = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert f"non-finite loss at step {step + 1}:" in err
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["type"] == "NonFiniteLossError"


def test_usage_errors_and_a_fresh_run_into_a_used_folder(data, tmp_path, capsys):
    assert cli.main(["finetune", "--data", str(data), "--out", str(tmp_path / "f"), "--labels-fraction", "0.1",
                     "--labelled-cases", "x.txt"]) == 2  # argparse: not allowed together
    assert "not allowed with argument" in capsys.readouterr().err
    run = tmp_path / "used"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "1", "--no-progress", *TINY]) == 0
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "1", "--no-progress", *TINY]) == 1
    assert "already holds checkpoints; pass --resume auto" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run", str(tmp_path / "nothing"), "--data", str(data)]) == 1
    assert "run folder not found" in capsys.readouterr().err


def test_bench_needs_a_source_checkout(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_repo_with_benchmarks", lambda: None)
    assert cli.main(["bench", "--preset", "quick"]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "run it from a source checkout" in err


def test_bench_forwards_to_the_sweep(capfd):
    assert cli.main(["bench", "--list", "--preset", "tiny", "--loss", "nt_xent"]) == 0
    assert "nt_xent" in capfd.readouterr().out


# ------------------------------------------------------------------------------------------ kill and resume
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def test_sigkill_during_training_then_resume_auto(data, tmp_path):
    run = tmp_path / "killed"
    args = ["-m", "macl.cli", "pretrain", "--data", str(data), "--out", str(run), "--steps", "60",
            "--checkpoint-every", "5", "--no-progress", *TINY]
    proc = subprocess.Popen([sys.executable, *args], env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "latest.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert not (run / "checkpoints" / "final.pt").exists()
    saved = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert 0 < saved < 60
    res = _macl(*args[2:], "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {run / 'checkpoints' / 'latest.pt'}" in res.stdout
    assert torch.load(run / "checkpoints" / "final.pt", weights_only=True)["step"] == 60
    assert _log_steps(run) == list(range(1, 61))  # the resumed run replaced the lines after the checkpoint
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "end"


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, time, torch
    from macl import cli
    marker, real_save, calls = sys.argv[1], torch.save, []
    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 4: step_0000004.pt was save 3, latest.pt is save 4: hang half-way through it
            f.write(b"PK-half-written-checkpoint")
            f.flush()
            open(marker, "w").close()
            time.sleep(600)
        return real_save(obj, f, *a, **k)
    torch.save = save
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(data, tmp_path):
    run, marker = tmp_path / "midwrite", tmp_path / "writing"
    args = ["pretrain", "--data", str(data), "--out", str(run), "--steps", "6", "--checkpoint-every", "2",
            "--no-progress", *TINY]
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(marker), *args], env=_env(), cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpts = run / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith("latest.pt.tmp")]
    assert len(partial) == 1 and partial[0].read_bytes() == b"PK-half-written-checkpoint"
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=True)
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 2  # the previous checkpoint, intact
    assert torch.load(ckpts / "step_0000004.pt", weights_only=True)["step"] == 4
    res = _macl(*args, "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and _log_steps(run) == [1, 2, 3, 4, 5, 6]
    assert torch.load(ckpts / "final.pt", weights_only=True)["step"] == 6


# ------------------------------------------------------------------------------------------ the demo
def test_demo_pipeline_at_a_tiny_size(tmp_path):
    from macl.demo.pipeline import DemoConfig, run_demo
    cfg = DemoConfig(name="test", n_subjects=5, shape=(32, 32, 16), test_fraction=0.4, labelled=1, base_width=4,
                     depth=2, patch=32, pretrain_steps=3, pretrain_batch=4, finetune_steps=3, finetune_batch=2,
                     finetune_seeds=(0, 1))
    stages = []
    res = run_demo(tmp_path / "demo", cfg, progress=lambda stage, d, t, info=None: stages.append(stage))
    assert stages[0] == "phantoms" and {"pretrain", "finetune (pretrained, seed 0)", "finetune (scratch, seed 0)"} <= set(stages)
    assert [r["class"] for r in res["table_rows"]] == ["organ", "kidneys", "vessel", "spine", "mean"]
    for row in res["table_rows"]:
        assert row["difference"] == pytest.approx(row["pretrained"] - row["scratch"])
    # the table reports what the two summary.json files say
    scr = [json.loads((tmp_path / "demo" / f"finetune_scratch_seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert res["table_rows"][0]["scratch"] == pytest.approx(sum(x["mean"]["1"]["Dice"] for x in scr) / 2)
    assert "from scratch" in res["table"] and "MACL pre-trained" in res["table"]
    # paired tests over the 2 seeds, from the per-seed means the row carries (scipy, independently here)
    from scipy import stats
    mean = res["table_rows"][-1]
    a, b = mean["per_seed"]["scratch"], mean["per_seed"]["pretrained"]
    if a != b:
        assert mean["p_t"] == pytest.approx(stats.ttest_rel(b, a).pvalue, nan_ok=True)
    assert "p (t-test)" in res["table"] and "p (Wilcoxon)" in res["table"] and "of 2 seeds" in res["table"]
    # the pre-training's per-term verdicts are printed and saved
    assert "MACL pre-training, per loss term" in res["table"] and [v["term"] for v in res["verdicts"]] == ["L_g", "L_d", "L_ER"]
    assert all(v["line"] in res["table"] for v in res["verdicts"])
    # pre-training saw only the training volumes
    listed = json.loads((tmp_path / "demo" / "pretrain_datalist.json").read_text())["training"]
    assert len(listed) == len(res["train"]) == 3 and not any(t in json.dumps(listed) for t in res["test"])
    for name in ("loss_curves.png", "dice_per_class.png", "prediction_overlay.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="holds a demo run made with other settings"):
        run_demo(tmp_path / "demo", DemoConfig(name="other", n_subjects=5, shape=(32, 32, 16)))
