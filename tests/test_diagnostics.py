"""Collapse diagnostics (macl.diagnostics), geometry checks (macl.settings.geometry) and presets (macl.settings.presets), issue 12."""
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from macl.settings.config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig
from macl.diagnostics import Diagnostics, DiagnosticsConfig, embedding_spread
from macl.settings.geometry import GeometryError, geometry_problems, require_valid_geometry
from macl.methods import Batch, build_method
from macl.settings.presets import resolve_reference_size
from macl.train import pretrain
from tests.test_train import read_log, synthetic_batches


# ------------------------------------------------------------------ spread statistics
def test_embedding_spread_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    stats = embedding_spread(rows)
    z = F.normalize(rows, dim=-1)
    cos = z @ z.transpose(1, 2)
    off = ~torch.eye(10, dtype=torch.bool)
    assert stats["cos"] == pytest.approx(float(cos[:, off].mean()), abs=1e-6)
    assert stats["std"] == pytest.approx(float(z.std(1, unbiased=False).mean()), abs=1e-6)
    assert stats["spread"] == pytest.approx(float(z.var(1, unbiased=False).sum(-1).sqrt().mean()), abs=1e-6)
    same = embedding_spread(torch.ones(1, 8, 4) + 1e-9 * torch.randn(1, 8, 4))
    assert same["cos"] == pytest.approx(1.0, abs=1e-5) and same["spread"] < 1e-3


def test_probes_give_the_constant_embedding_value_of_each_term():
    """With every embedding equal, each probed term's loss is c·log(keys per anchor): 4.906 for B = 16."""
    torch.manual_seed(0)
    method = build_method(NetConfig(base_width=4, depth=2), MethodConfig(preset="faithful"))
    x = torch.full((16, 1, 32, 32), 0.5)
    with torch.no_grad():
        terms = method.eval()(Batch(torch.rand(16), x, x, x, x))
    assert set(method.probes) == {"L_g", "L_d"}
    for name in ("L_g", "L_d"):
        probe = method.probes[name]
        assert probe.keys_per_anchor == 31
        assert probe.scale * math.log(probe.keys_per_anchor) == pytest.approx(math.log(31) * 0.1 / 0.07)
    # the constant is what the package's own losses give when every embedding is the same
    from macl.methods.macl import dense_loss, global_loss
    z = torch.randn(1, 8).expand(16, 8)
    const = math.log(31) * 0.1 / 0.07
    assert float(global_loss(z, z, torch.rand(16), method.cfg)) == pytest.approx(const, rel=1e-5)
    p = torch.randn(1, 8, 1, 1).expand(16, 8, 4, 4)
    assert float(dense_loss(p, p, torch.rand(16), method.cfg)) == pytest.approx(const, rel=1e-5)
    assert set(terms) == {"L_g", "L_d", "L_ER"}
    assert method.probes["L_d"].rows().shape == (8 * 8, 32, 4)  # L_d grid 8x8, 2B anchors, F·2^(d−k) = 4 channels


# one torch thread (tests/conftest.py): these runs are tiny
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ the warning, the verdicts
def constant_batches(start):
    """Every image of every batch the same (images differ only by branch: the two heads differ)."""
    x = torch.full((8, 1, 32, 32), 0.5)
    while True:
        yield Batch(torch.linspace(0.05, 0.95, 8), x, x, x, x)


def tiny(steps, window, **method):
    return PretrainConfig(net=NetConfig(base_width=4, depth=2), method=MethodConfig(**method),
                          optim=OptimConfig(lr=0.05),
                          train=TrainConfig(steps=steps, checkpoint_every=0, collapse_window=window,
                                            diag_grad_every=5))


@pytest.mark.slow
def test_cli_warns_on_the_faithful_collapse_and_prints_verdicts(tmp_path, capsys):
    """The demo's setting at a smaller width (phantoms, 64² crops, depth 3, B = 16) with the public code's heads:
    L_g collapses to log(31)·τ/0.07 within ~40 steps. The warning goes to stderr and events.jsonl, the verdicts
    to stdout, events.jsonl and diagnostics.json; log.jsonl carries the per-step diagnostics."""
    from macl import cli
    from macl.data import PhantomConfig, write_phantom_dataset
    data = write_phantom_dataset(tmp_path / "ds", PhantomConfig(n_subjects=6, shape=(64, 64, 16), seed=0))
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--preset", "faithful", "--patch-size", "64",
                     "--depth", "3", "--base-width", "8", "--batch-size", "16", "--steps", "80", "--device", "cpu",
                     "--no-progress", "--checkpoint-every", "0", "--set", "train.collapse_window=20",
                     "--set", "train.diag_grad_every=40"]) == 0
    captured = capsys.readouterr()
    warning = [ln for ln in captured.err.splitlines() if "L_g collapsed at step" in ln]
    assert len(warning) == 1 and "constant-embedding value 4.9057" in warning[0]
    verdict = [ln.strip() for ln in captured.out.splitlines() if ln.strip().startswith("L_g collapsed at step")]
    assert len(verdict) == 1 and "vs 4.906 at a constant embedding" in verdict[0]
    assert any(ln.strip().startswith("L_ER: ") for ln in captured.out.splitlines())
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    logged = [e["message"] for e in events if e["event"] == "log"]
    assert any("L_g collapsed at step" in m and "for 20 steps" in m for m in logged)  # the warning
    assert verdict[0] in logged  # the verdict line, as printed
    (ev,) = [e for e in events if e["event"] == "verdicts"]
    assert [v["term"] for v in ev["verdicts"]] == ["L_g", "L_d", "L_ER"] and ev["verdicts"][0]["status"] == "collapsed"
    saved = json.loads((run / "diagnostics.json").read_text())
    assert saved["verdicts"][0]["line"] == verdict[0] and saved["events"][0]["term"] == "L_g"
    log = read_log(run)
    assert log[-1]["L_g_cos"] > 0.95 and log[-1]["L_g_const"] == pytest.approx(4.9057, abs=1e-4)
    assert {"L_g_grad_share", "L_d_grad_share", "L_ER_grad_share"} <= set(log[39])  # step 40


def test_no_warning_on_a_run_that_learns(tmp_path, caplog):
    """The synthetic anatomy of test_train, which MACL learns (retrieval rises there): silent, verdict 'learned'."""
    with caplog.at_level(logging.WARNING, logger="macl.diagnostics"):
        cfg = tiny(60, 20)
        cfg.net.base_width, cfg.optim.lr = 8, 0.01
        result = pretrain(cfg, synthetic_batches(1, 16, 32, 2), str(tmp_path))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    by_term = {v["term"]: v for v in result.verdicts}
    assert by_term["L_g"]["status"] == "learned", by_term["L_g"]["line"]
    assert by_term["L_g"]["value"] < 0.99 * by_term["L_g"]["constant"]
    assert by_term["L_ER"]["status"] == "no constant"
    assert json.loads((tmp_path / "diagnostics.json").read_text())["events"] == []


def test_diagnostics_can_be_switched_off(tmp_path):
    cfg = tiny(2, 5)
    cfg.train.diagnostics = False
    result = pretrain(cfg, constant_batches, str(tmp_path))
    assert result.verdicts == [] and "L_g_cos" not in read_log(tmp_path)[0]
    assert not (tmp_path / "diagnostics.json").exists()


def test_verdict_for_a_short_run_near_its_constant_is_undecided():
    d = Diagnostics(DiagnosticsConfig(window=50))

    class M:
        probes = {}
    from macl.methods.base import EmbeddingProbe
    M.probes = {"L_g": EmbeddingProbe(lambda: torch.randn(1, 8, 4), 15, 1.0)}
    for step in range(1, 11):
        d.observe(step, M, {"L_g": math.log(15) * 1.001, "loss": 0.0}, logged=False)
    (v,) = d.verdicts()
    assert v["status"] == "undecided" and "near it for the last 10 steps" in v["line"]


# ------------------------------------------------------------------ geometry
def test_geometry_rejects_64_at_depth_4_naming_valid_sizes():
    with pytest.raises(GeometryError) as err:
        require_valid_geometry(NetConfig(depth=4), MethodConfig(), (64, 64))
    msg = str(err.value)
    assert "\n" not in msg and "L_ER is degenerate" in msg and "dominant bottleneck is 1x1" in msg
    assert "a patch of 128x128 at depth 4" in msg and "depth 3 at patch 64x64" in msg
    for patch, depth in ((128, 4), (64, 3), (32, 2), (96, 3)):  # the named sizes, and the demo's, are accepted
        require_valid_geometry(NetConfig(depth=depth), MethodConfig(), (patch, patch))


def test_geometry_per_term_and_per_method():
    assert geometry_problems(NetConfig(depth=4), MethodConfig(lambda_er=0.0), (64, 64)) == []  # L_ER off: fine
    probs = geometry_problems(NetConfig(depth=5), MethodConfig(lambda_er=0.0), (64, 64))
    assert len(probs) == 1 and "L_d grid is 2x2" not in probs[0] and "divisible" in probs[0]
    probs = geometry_problems(NetConfig(depth=4), MethodConfig(decoder_blocks=1, dominant_scale=0.5), (16, 16))
    assert any("L_d grid is 1x1" in p for p in probs)
    assert geometry_problems(NetConfig(depth=4), MethodConfig(name="pcl"), (64, 64)) == []
    with pytest.raises(GeometryError, match="1x1x1"):
        require_valid_geometry(NetConfig(dims=3, depth=2), MethodConfig(), (16, 16, 16))


def test_pretrain_checks_geometry_before_the_first_step(tmp_path):
    cfg = tiny(2, 5)
    cfg.net.depth = 3  # 32² at depth 3: 1x1 dominant bottleneck
    with pytest.raises(GeometryError, match="depth 2 at patch 32x32"):
        pretrain(cfg, constant_batches, str(tmp_path))


# ------------------------------------------------------------------ presets
def test_presets_decide_the_head_and_the_augmentation_scale():
    assert MethodConfig(preset="faithful").image_head_norm == "none"
    assert MethodConfig(preset="robust").image_head_norm == "batch"
    assert MethodConfig(preset="faithful", head_norm="batch").image_head_norm == "batch"  # explicit wins
    assert resolve_reference_size(None, "faithful") is None and resolve_reference_size(None, "robust") == 512
    assert resolve_reference_size("crop", "robust") is None and resolve_reference_size(256, "faithful") == 256
    with pytest.raises(ValueError, match="method.preset"):
        MethodConfig(preset="fast")
    with pytest.raises(ValueError, match="reference_size"):
        resolve_reference_size(-3, "robust")
    faithful = build_method(NetConfig(base_width=4, depth=2), MethodConfig(preset="faithful"))
    robust = build_method(NetConfig(base_width=4, depth=2), MethodConfig(preset="robust"))
    extra = set(robust.state_dict()) - set(faithful.state_dict())
    assert extra and all(".norm." in k and "image_head" in k for k in extra)
    assert set(faithful.pretrained_state_dict()) == set(robust.pretrained_state_dict())  # same exported tensors


def test_runs_stored_before_the_presets_resume_as_faithful():
    """Configs saved before `method.preset` existed were the public code: they must rebuild its heads."""
    from macl.settings.config import to_dict
    from macl.settings.presets import stored_config
    from macl.workflow import PretrainSpec
    old = to_dict(PretrainConfig())
    del old["method"]["preset"], old["method"]["head_norm"]
    assert stored_config(old)["method"]["preset"] == "faithful" and "preset" not in old["method"]
    spec = PretrainSpec.from_dict({"data": {"path": "x"}, "pretrain": old})
    assert spec.config.method.image_head_norm == "none" and spec.data_config().views.spatial.reference_size is None
    assert PretrainSpec.from_dict({"data": {"path": "x"}}).config.method.preset == "robust"
