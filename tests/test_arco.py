"""ARCO: the memory bank, the EMA, the contrast against a naive cross-entropy over [prototype, negatives],
the masks, the nearest-neighbour term's gradient, the pseudo-label loss, CutMix, and train_semi end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from macl.settings.config import NetConfig
from macl.data import PhantomConfig, write_phantom_dataset
from macl.semi.losses import (ClassMemoryBank, ContrastMasks, NNPool, arco_contrast, contrast_masks, ema_update,
                               nn_term, percentile, prototype_contrast, unsup_loss)
from macl.nets import UNet
from macl.semi.loop import SemiConfig, train_semi
from macl.semi.augment import cutmix, cutmix_boxes, strong_intensity


# ------------------------------------------------------------------------------------------ bank
def test_bank_is_fifo_with_the_configured_size():
    bank = ClassMemoryBank([5, 3], dim=2, coord_dims=2)
    pushed = []
    for i in range(4):                                              # 4 pushes of 2 into a queue of 5
        keys = torch.tensor([[i, 0.0], [i, 1.0]])
        bank.push(0, keys, keys / 10)
        pushed.append(keys)
        everything = torch.cat(pushed)
        got, coords = bank.get(0)
        assert torch.equal(got, everything[-5:])                    # the newest 5, oldest first
        assert torch.equal(coords, everything[-5:] / 10)
    assert int(bank.count[0]) == 5 and bank.get(1)[0].shape == (0, 2)
    big = torch.arange(14.0).reshape(7, 2)                          # a push larger than the queue keeps its tail
    bank.push(1, big, big)
    assert torch.equal(bank.get(1)[0], big[-3:])
    clone = ClassMemoryBank([5, 3], dim=2, coord_dims=2)
    clone.load_state_dict(bank.state_dict())                        # checkpointed with the run
    assert torch.equal(clone.get(0)[0], bank.get(0)[0])
    with pytest.raises(ValueError, match="class 2"):
        bank.push(2, big, big)


def test_ema_update_moves_the_teacher_one_percent_towards_the_student():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student(torch.randn(8, 3))                                      # moves the student's running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.99)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        expect = 0.99 * before[k] + 0.01 * s if v.is_floating_point() else s
        assert torch.allclose(v, expect), k


# ------------------------------------------------------------------------------------------ contrast
def naive_ce(anchors, proto, negs, tau):
    """The public code's loss: cosine logits over [prototype | negatives], cross-entropy with target 0."""
    A = anchors.shape[0]
    if negs.dim() == 2:
        negs = negs.expand(A, -1, -1)
    keys = torch.cat([proto.expand(A, 1, -1), negs], 1)
    logits = F.cosine_similarity(anchors[:, None], keys, dim=2) / tau
    return F.cross_entropy(logits, torch.zeros(A, dtype=torch.long))


@pytest.mark.parametrize("paired", [True, False])
def test_prototype_contrast_equals_naive_cross_entropy(paired):
    g = torch.Generator().manual_seed(1)
    anchors = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    proto = torch.randn(5, generator=g, dtype=torch.float64)
    negs = torch.randn(*((7, 9, 5) if paired else (9, 5)), generator=g, dtype=torch.float64)
    ours = prototype_contrast(anchors, proto, negs, temperature=0.5, impl="torch")
    ref = naive_ce(anchors, proto, negs, 0.5)
    g1, = torch.autograd.grad(ours, anchors)
    g2, = torch.autograd.grad(ref, anchors)
    assert torch.allclose(ours, ref, rtol=1e-10) and torch.allclose(g1, g2, rtol=1e-8, atol=1e-12)


def _toy(g):
    """2 images 6×6, 3 classes, features (2, 4, 6, 6); masks built by hand."""
    rep = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t_rep = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    valid = [labels == c for c in range(3)]
    anchors = [v & (torch.rand(2, 6, 6, generator=g) > 0.3) for v in valid]
    negatives = [labels != c for c in range(3)]
    return rep, t_rep, ContrastMasks(valid, anchors, negatives)


def test_all_mode_equals_naive_over_every_anchor_and_the_whole_bank():
    g = torch.Generator().manual_seed(2)
    rep, t_rep, masks = _toy(g)
    bank = ClassMemoryBank([40, 40, 40], dim=4, coord_dims=2).double()
    out = arco_contrast(rep, t_rep, masks, bank, sampler="all", temperature=0.5, impl="torch")
    total = 0
    for c in range(3):                                               # independent transcription, class by class
        a = rep.permute(0, 2, 3, 1)[masks.anchors[c]]
        proto = t_rep.permute(0, 2, 3, 1)[masks.valid[c]].mean(0)
        bank_c = t_rep.permute(0, 2, 3, 1)[masks.negatives[c]][-40:]   # the FIFO kept the newest 40
        total = total + naive_ce(a, proto, bank_c, 0.5)
    ref = total / 3
    assert int(out["classes"]) == 3
    g1, = torch.autograd.grad(out["loss"], rep)
    g2, = torch.autograd.grad(ref, rep)
    assert torch.allclose(out["loss"], ref, rtol=1e-10) and torch.allclose(g1, g2, atol=1e-12)


@pytest.mark.parametrize("sampler", ["sg", "sag", "ns", "index_sg"])
def test_sampled_mode_uses_sampled_anchors_and_bank_negatives(sampler):
    g = torch.Generator().manual_seed(3)
    rep, t_rep, masks = _toy(g)
    bank = ClassMemoryBank([50, 50, 50], dim=4, coord_dims=2).double()
    out = arco_contrast(rep, t_rep, masks, bank, sampler=sampler, num_anchors=8, num_negatives=6, grid=2,
                        generator=torch.Generator().manual_seed(0), impl="torch")
    out["loss"].backward()
    touched = (rep.grad.abs().sum(1) > 0)
    anchors_any = masks.anchors[0] | masks.anchors[1] | masks.anchors[2]
    assert bool(touched.any()) and not bool((touched & ~anchors_any).any())   # gradient only at anchor pixels
    assert int(touched.sum()) <= 3 * 8 and int(out["classes"]) == 3
    single = ContrastMasks([m if c == 0 else torch.zeros_like(m) for c, m in enumerate(masks.valid)],
                           masks.anchors, masks.negatives)
    assert arco_contrast(rep, t_rep, single, bank, sampler=sampler)["loss"].item() == 0.0   # one class: no contrast


def test_masks_follow_the_public_rules():
    # 1 labelled + 1 unlabelled image of 1×4 pixels, 4 classes.
    labels = torch.tensor([[[0, 1, 2, 3]], [[0, 0, 1, 1]]])
    tp = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.2, 0.6, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1], [0.04, 0.06, 0.2, 0.7]])
    teacher = torch.stack([tp.T[:, None, :], tp.T[:, None, :]])              # (2, 4, 1, 4): pixel j has row j
    sp = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    student = torch.stack([sp.T[:, None, :], sp.T[:, None, :]])
    m = contrast_masks(labels, teacher, student, torch.tensor([True, False]), alpha=30.0)
    # unlabelled entropies increase along the row: α=30 keeps pixel 0 reliable, 100−α=70 marks pixel 3 unreliable
    assert m.valid[0][1].tolist() == [[True, False, False, False]]
    assert m.valid[1][0].tolist() == [[False, True, False, False]]           # every labelled pixel is reliable
    assert m.anchors[2][0].tolist() == [[False, False, False, False]]         # pixel 2 of class 2: p̄_2 = 0.2 ≤ 0.3
    assert m.anchors[3][0].tolist() == [[False, False, False, True]]
    # labelled negatives of class 0: label ≠ 0 and class 0 within the teacher's top 3 (pixels 1 and 2, not 3)
    assert m.negatives[0][0].tolist() == [[False, True, True, False]]
    # unlabelled negatives of class 3: only pixel 3 is unreliable, and the teacher ranks class 3 first there
    assert m.negatives[3][1].tolist() == [[False, False, False, False]]
    assert m.negatives[0][1].tolist() == [[False, False, False, True]]        # class 0 ranked 4th at pixel 3
    assert float(percentile(torch.tensor([1.0, 2.0, 3.0, 4.0]), 25)) == pytest.approx(1.75)


# ------------------------------------------------------------------------------------------ other terms
def test_nn_term_public_has_no_gradient_student_mode_has():
    g = torch.Generator().manual_seed(4)
    pool = NNPool(6, 2 * 3 * 3, g)
    pool.push(torch.randn(6, 2, 3, 3, generator=g))
    s = torch.randn(2, 2, 3, 3, generator=g, requires_grad=True)
    t = torch.randn(2, 2, 3, 3, generator=g)
    public = nn_term(s, t, pool, topk=2, mode="public")
    assert not public.requires_grad                                   # the public code's term is a constant
    sn, tn, bank = F.normalize(s.reshape(2, -1), dim=1), F.normalize(t.reshape(2, -1), dim=1), pool.pool
    idx = (2 - 2 * sn @ bank.T).topk(2, dim=1, largest=False).indices   # get_revisiting_loss, transcribed
    assert torch.allclose(public, torch.gather(2 - 2 * tn @ bank.T, 1, idx).mean())
    student = nn_term(s, t, pool, topk=2, mode="student")
    grad, = torch.autograd.grad(student, s)
    assert float(grad.abs().sum()) > 0
    assert nn_term(s, t, pool, mode="off").item() == 0.0


def test_unsup_loss_weights_each_image_by_its_confident_fraction():
    logits = torch.randn(2, 3, 2, 2)
    pseudo = torch.randint(0, 3, (2, 2, 2))
    conf = torch.tensor([[[0.99, 0.98], [0.5, 0.1]], [[0.1, 0.2], [0.3, 0.4]]])   # 50 % and 0 % confident
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    expect = (0.5 * ce[0].sum() + 0.0 * ce[1].sum()) / 8
    assert torch.allclose(unsup_loss(logits, pseudo, conf), expect)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_cutmix_pastes_the_next_image_inside_a_half_box(spatial):
    g = torch.Generator().manual_seed(5)
    x = torch.arange(3.0)[:, None].expand(3, math.prod(spatial)).reshape(3, 1, *spatial).clone()
    y = torch.arange(3)[:, None].expand(3, math.prod(spatial)).reshape(3, *spatial).clone()
    c = x[:, 0] / 10
    state = g.get_state()
    xm, ym, cm = cutmix(x, y, c, g)
    g.set_state(state)
    box = cutmix_boxes(3, spatial, g)
    for b in range(3):
        nxt = (b + 1) % 3
        assert bool((xm[b, 0][box[b]] == nxt).all()) and bool((xm[b, 0][~box[b]] == b).all())
        assert bool((ym[b][box[b]] == nxt).all()) and torch.equal(cm[b], xm[b, 0] / 10)
        assert abs(float(box[b].float().mean()) - 0.5) < 0.1
    blurred = strong_intensity(torch.randn(4, 1, *spatial), g, p_jitter=1.0, p_blur=1.0)
    assert blurred.shape == (4, 1, *spatial) and bool(torch.isfinite(blurred).all())


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("arco_phantom"),
                                 PhantomConfig(n_subjects=5, shape=(16, 16, 8), seed=6))


def semi_cfg(**kw):
    base = dict(net=NetConfig(dims=2, base_width=4, depth=2), dims=2, patch_size=(16, 16), steps=6, batch_size=2,
                labels_fraction=0.34, test_fraction=0.2, num_anchors=16, num_negatives=8, rep_dim=8, bank_size=300,
                background_bank_size=400, grid=2, checkpoint_every=3, log_every=1, lr=0.05, seed=1)
    base.update(kw)
    return SemiConfig(**base)


def test_train_semi_lowers_the_loss_and_resumes_exactly(phantom_root, tmp_path):
    cfg = semi_cfg()
    full = train_semi(phantom_root, tmp_path / "full", cfg)
    log = [json.loads(x) for x in open(tmp_path / "full" / "semi_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["L_sup"] < log[0]["L_sup"] - 0.2, [r["L_sup"] for r in log]
    assert all(r["contrast_classes"] >= 2 for r in log)
    split = full.split
    assert set(split["unlabelled"]) == set(split["train"]) - set(split["labelled"]) and split["test"]

    class Crash(Exception):
        pass

    def crash(step, total, record):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_semi(phantom_root, tmp_path / "part", cfg, progress=crash)
    part = train_semi(phantom_root, tmp_path / "part", cfg)
    a = torch.load(tmp_path / "full" / "checkpoint_latest.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "part" / "checkpoint_latest.pt", weights_only=True)["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)                 # student, teacher, bank, pool: all equal
    assert part.last_record["loss"] == log[-1]["loss"]
    unet = UNet(NetConfig(dims=2, base_width=4, depth=2), len(full.class_names))
    unet.load_state_dict(torch.load(tmp_path / "full" / "model_final.pt", weights_only=True))
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert "foreground_mean" in summary
    with pytest.raises(ValueError, match="another split or other settings"):
        train_semi(phantom_root, tmp_path / "part", semi_cfg(sampler="sag"))


def test_semi_config_names_bad_values():
    with pytest.raises(ValueError, match="'stratified'"):
        semi_cfg(sampler="stratified")
    with pytest.raises(ValueError, match="nn_mode"):
        semi_cfg(nn_mode="both")
    assert SemiConfig(dims=3, patch_size=(16, 16, 16)).sampler == "sag" and SemiConfig().sampler == "sg"
