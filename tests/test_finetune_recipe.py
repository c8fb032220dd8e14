"""The fine-tuning recipe (macl.nets.freeze, macl.nets.param_groups, macl.run.validation): frozen parts, learning-rate groups and
schedule, the kept validation step, the CLI flags."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from macl.data import PhantomConfig, load_volumes, open_dataset, write_phantom_dataset
from macl.finetune import FinetuneConfig, evaluate, finetune
from macl.nets.freeze import recalibrate_batchnorm
from macl.nets.param_groups import build_optimizer, lr_factor
from macl.nets import build_finetune_net
from macl.settings.config import NetConfig

NET = NetConfig(dims=2, base_width=4, depth=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"),
                                 PhantomConfig(n_subjects=6, shape=(24, 24, 12), seed=4))


def _cfg(**kw):
    base = dict(dims=2, patch_size=(24, 24), steps=6, batch_size=4, checkpoint_every=3, log_every=1,
                test_fraction=0.34, seed=1, lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


def _pretrained_state():
    """Every encoder and decoder tensor of another (seed 123) network: the 'pre-trained' weights."""
    torch.manual_seed(123)
    src = build_finetune_net(NET, 5)
    return {k: v.clone() for k, v in src.state_dict().items() if k.startswith(("encoder.", "decoder."))}


class Keep:
    """model_factory that remembers the network it built."""

    def __init__(self):
        self.model = None

    def __call__(self, in_ch, k):
        self.model = build_finetune_net(NetConfig(dims=2, base_width=4, depth=2, in_channels=in_ch), k)
        return self.model


@pytest.mark.parametrize("freeze,moved", [("encoder", ("decoder.", "head.")), ("encoder+decoder", ("head.",))])
def test_frozen_parameters_are_bit_identical_after_training(phantom, tmp_path, freeze, moved):
    pre = _pretrained_state()
    keep = Keep()
    res = finetune(phantom, tmp_path / freeze, keep, _cfg(freeze=freeze, labels_fraction=0.5), pretrained=pre,
                   evaluate_test=False)
    after = res.model.state_dict()
    frozen = [k for k in pre if not k.startswith(moved)]
    assert frozen
    for k in frozen:  # parameters and BatchNorm statistics: exactly the pre-trained tensors
        assert torch.equal(after[k], pre[k]), k
    trained = [k for k in after if k.startswith(moved) and after[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(after[k], pre.get(k, torch.zeros_like(after[k]))) for k in trained)
    # the saved final model too
    saved = torch.load(tmp_path / freeze / "model_final.pt", weights_only=True)
    assert all(torch.equal(saved[k], pre[k]) for k in frozen)


def test_probe_with_recalibrated_statistics_keeps_parameters(phantom, tmp_path):
    pre = _pretrained_state()
    res = finetune(phantom, tmp_path / "probe", Keep(), _cfg(freeze="encoder+decoder", bn_recalibrate=3,
                                                           labels_fraction=0.5), pretrained=pre, evaluate_test=False)
    after = res.model.state_dict()
    params = {n for n, _ in res.model.named_parameters()}
    for k in pre:
        if k in params:
            assert torch.equal(after[k], pre[k]), k
    stats = [k for k in pre if k.endswith("running_mean")]
    assert stats and all(not torch.equal(after[k], pre[k]) for k in stats)  # re-estimated, then frozen


def test_recalibration_is_the_batch_statistics():
    torch.manual_seed(0)
    model = build_finetune_net(NET, 2)
    xs = [torch.randn(4, 1, 16, 16) * 3 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, ("encoder.",), xs) > 0
    bn = model.encoder.stages[0][0].norm  # conv -> BN: the first BN sees conv(x) of every batch
    conv = model.encoder.stages[0][0].conv
    with torch.no_grad():
        y = torch.cat([conv(x) for x in xs])
    assert isinstance(bn, torch.nn.BatchNorm2d)
    torch.testing.assert_close(bn.running_mean, y.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    var = torch.stack([conv(x).detach().var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_learning_rates_reach_the_optimiser_groups():
    torch.manual_seed(0)
    model = build_finetune_net(NET, 3)
    loaded = sorted(k for k, _ in model.named_parameters() if k.startswith("encoder."))
    cfg = FinetuneConfig(steps=10, lr=1e-3, min_lr=1e-5, pretrained_lr_scale=0.1, probe_steps=3, warmup_steps=2)
    opt, sched = build_optimizer(model, cfg, loaded)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"pretrained", "new", "head"}
    named = dict(model.named_parameters())
    assert {id(p) for p in groups["pretrained"]["params"]} == {id(named[k]) for k in loaded}
    assert {id(p) for p in groups["head"]["params"]} == {id(model.head.weight)}
    seen = []
    for step in range(10):
        seen.append({n: g["lr"] for n, g in ((g["name"], g) for g in opt.param_groups)})
        opt.step()
        sched.step()

    def cosine(base, t, span):  # hand-written: min_lr + (base - min_lr) (1 + cos(pi t / span)) / 2
        return 1e-5 + (base - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / span))
    for step, lrs in enumerate(seen):
        assert lrs["head"] == pytest.approx(cosine(1e-3, step, 10), rel=1e-9)
        if step < 3:  # the linear probe: only the head learns
            assert lrs["pretrained"] == 0 and lrs["new"] == 0
        else:
            t = step - 3
            warm = min(1.0, (t + 1) / 2)
            assert lrs["new"] == pytest.approx(warm * cosine(1e-3, t, 7), rel=1e-9)
            assert lrs["pretrained"] == pytest.approx(warm * cosine(1e-4, t, 7), rel=1e-9)
    assert seen[3]["pretrained"] == pytest.approx(0.5 * 1e-4, rel=1e-9)
    assert lr_factor(0, 10, 1e-3, 1e-5, 0, 0, False) == 1.0


def test_probe_then_finetune_moves_only_the_head_first(phantom, tmp_path):
    pre = _pretrained_state()
    keep, snap = Keep(), {}

    def progress(done, total, info):
        if done == 2:
            snap.update({k: v.clone() for k, v in keep.model.state_dict().items()})
    finetune(phantom, tmp_path / "lpft", keep, _cfg(probe_steps=2, warmup_steps=2, pretrained_lr_scale=0.5,
                                                    labels_fraction=0.5), pretrained=pre, progress=progress,
             evaluate_test=False)
    params = {n for n, _ in keep.model.named_parameters()}
    for k in pre:
        if k in params:
            assert torch.equal(snap[k], pre[k]), k  # steps 1-2: learning rate 0 outside the head
    assert any(not torch.equal(keep.model.state_dict()[k], pre[k]) for k in pre if k in params)


def test_kept_checkpoint_is_the_best_validation_step(phantom, tmp_path):
    run = tmp_path / "val"
    keep = Keep()
    res = finetune(phantom, run, keep, _cfg(steps=8, val_fraction=0.5, val_every=2, checkpoint_every=4,
                                            lr=5e-2))
    split = json.loads((run / "split.json").read_text())
    assert split["val"] and not set(split["val"]) & set(split["labelled"])
    curve = [json.loads(line) for line in (run / "val_log.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4, 6, 8]
    best = max(curve, key=lambda c: (c["dice"], -c["step"]))  # highest Dice, earliest on ties
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kept"]["step"] == best["step"] and summary["kept"]["val_dice"] == pytest.approx(best["dice"])
    # independently: the final model scores the kept step's Dice on the validation cases
    final = torch.load(run / "model_final.pt", weights_only=True)
    keep.model.load_state_dict(final)
    index = open_dataset(phantom)
    vols = load_volumes(index, labelled_only=True, cases=[c for c in index.cases if c.case_id in split["val"]])
    names = {int(k): v for k, v in json.loads((run / "finetune_config.json").read_text())["class_names"].items()}
    again = evaluate(keep.model, vols, _cfg(), None, names)["foreground_mean"]["Dice"]
    assert again == pytest.approx(best["dice"], abs=1e-9)
    if best["step"] != 8:  # the last state is kept aside and differs
        last = torch.load(run / "model_last.pt", weights_only=True)
        assert any(not torch.equal(last[k], final[k]) for k in final)
    # re-evaluating the run (macl evaluate --run) rewrites summary.json and keeps the record of the kept step
    from macl.finetune import evaluate_run
    rerun = evaluate_run(run, phantom, Keep())
    assert rerun["kept"] == summary["kept"] == json.loads((run / "summary.json").read_text())["kept"]


def test_bad_recipe_settings_are_named():
    with pytest.raises(ValueError, match="'decoder'"):
        _cfg(freeze="decoder")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        _cfg(val_fraction=1.0)
    with pytest.raises(ValueError, match="probe_steps"):
        _cfg(probe_steps=6)
    with pytest.raises(ValueError, match="spatial_aug"):
        _cfg(spatial_aug="elastic")
    with pytest.raises(ValueError, match="everything is frozen|nothing to train"):
        model = build_finetune_net(NET, 2)
        for p in model.parameters():
            p.requires_grad_(False)
        build_optimizer(model, _cfg(pretrained_lr_scale=0.5), [])


def test_monai_spatial_aug_moves_image_and_label_together(phantom):
    from macl.data.segsampling import SegBatchSampler, SegSamplingConfig
    vols = load_volumes(open_dataset(phantom), labelled_only=True)[:2]
    plain = SegBatchSampler(vols, SegSamplingConfig(2, (24, 24), mirror=False), seed=0)
    aug = SegBatchSampler(vols, SegSamplingConfig(2, (24, 24), mirror=False, spatial_aug="monai"), seed=0)
    a_img, a_lab = aug.batch(5, 8)
    assert torch.equal(aug.batch(5, 8)[0], a_img)  # a pure function of (seed, step)
    p_img, _ = plain.batch(5, 8)
    assert not torch.equal(a_img, p_img)
    assert set(a_lab.unique().tolist()) <= set(range(8)) and a_lab.dtype == torch.int64
    # image and label get the same draw: augment a label map as both; bilinear vs nearest agree almost everywhere
    import numpy as np
    from macl.data.seg_augment import monai_spatial
    lab = a_lab[:4]
    img, out = monai_spatial(lab.float(), lab, np.random.default_rng(3), prob=1.0)
    assert not torch.equal(out, lab)
    assert (img.round().long() == out).float().mean() > 0.9


def test_cli_flags_reach_the_config(phantom, tmp_path):
    run = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "macl.cli", "finetune", "--data", str(phantom), "--out", str(run),
                          "--steps", "4", "--batch-size", "2", "--patch-size", "24", "--base-width", "4", "--depth",
                          "2", "--freeze", "encoder", "--val-fraction", "0.5", "--val-every", "2",
                          "--pretrained-lr-scale", "0.3", "--spatial-aug", "monai", "--foreground-prob", "0",
                          "--loss", "ce", "--threads", "1", "--no-progress"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((run / "finetune_config.json").read_text())["config"]
    assert (cfg["freeze"], cfg["val_fraction"], cfg["val_every"], cfg["pretrained_lr_scale"], cfg["spatial_aug"],
            cfg["foreground_prob"], cfg["loss"]) == ("encoder", 0.5, 2, 0.3, "monai", 0.0, "ce")
    assert json.loads((run / "summary.json").read_text())["kept"]["step"] in (2, 4)


def test_pretraining_can_leave_the_test_split_out(phantom, tmp_path):
    from macl.workflow import _kept_cases
    index = open_dataset(phantom)
    ids = [c.case_id for c in index.cases]
    (tmp_path / "test.txt").write_text("\n".join(ids[:2]) + "\n")
    kept = _kept_cases(index, str(tmp_path / "test.txt"))
    assert [c.case_id for c in kept] == ids[2:]
    assert _kept_cases(index, None) is None
    with pytest.raises(ValueError, match="nope"):
        _kept_cases(index, ["nope"])
    with pytest.raises(ValueError, match="no case"):
        _kept_cases(index, ids)
