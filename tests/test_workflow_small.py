"""Issue 22 item 8, the workflow's smaller items: `--help` without the medical extra, the demo without
matplotlib, a shell-quoted next-step command. (SIGTERM: tests/test_signals.py; evaluate into a read-only folder:
tests/test_predict_pipeline.py.)"""
import shlex
import sys

import pytest
import torch

from macl import cli, extras
from macl.data import PhantomConfig, write_phantom_dataset

MEDICAL = ("monai", "nibabel", "scipy", "tqdm")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _without(monkeypatch, names):
    """As test_packaging does: the packages are not found, and importing one fails."""
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name in names else real(name))
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("command, flag", [("pretrain", "--batch-size"), ("demo", "--quick"),
                                           ("finetune", "--labels-fraction"), ("predict", "--skip-bad")])
def test_help_works_without_the_medical_extra(monkeypatch, capsys, command, flag):
    _without(monkeypatch, MEDICAL + ("matplotlib",))
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert flag in out and f'note: macl {command} needs the medical extra' in out and 'pip install "macl[medical]"' in out
    # running it (not asking for help) is still the one-line error
    assert cli.main([command, "--out", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"macl: error: macl {command} needs the medical extra"), err


def test_demo_runs_without_matplotlib(monkeypatch, tmp_path, capsys):
    from macl.demo import pipeline
    tiny = pipeline.DemoConfig(name="tiny", n_subjects=5, shape=(32, 32, 16), test_fraction=0.4, labelled=1,
                               base_width=4, depth=2, patch=32, pretrain_steps=2, pretrain_batch=4, finetune_steps=2,
                               finetune_batch=2, finetune_seeds=(0,))
    monkeypatch.setattr(pipeline.DemoConfig, "quick", classmethod(lambda cls: tiny))
    _without(monkeypatch, ("matplotlib",))
    assert extras.command_problem("demo") is None
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "figures: none (matplotlib is not installed" in printed.out and "MACL pre-trained" in printed.out
    assert "no figures: matplotlib is not installed" in printed.err
    assert (out / "table.txt").is_file() and not list(out.glob("*.png"))


def test_next_step_command_is_shell_quoted(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "ds", PhantomConfig(n_subjects=4, shape=(32, 32, 8), seed=5))
    run = tmp_path / "my runs" / "it's pre"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--steps", "1", "--patch-size", "32",
                     "--batch-size", "2", "--base-width", "4", "--depth", "2", "--device", "cpu", "--threads", "1",
                     "--no-progress"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "macl finetune --pretrained" in ln)
    command = line[line.index("(macl finetune") + 1:line.rindex(" ...)")]
    assert shlex.split(command) == ["macl", "finetune", "--pretrained", str(run)]
