"""Each public loss against an independent transcription of its published definition."""
import pytest
import torch
import torch.nn.functional as F

from macl_kernels import (DenseInfoNCELoss, NTXentLoss, PositionalSupConLoss, SupConLoss, dense_info_nce,
                          info_nce, nt_xent, positional_sup_con, sup_con)

IMPLS = ["reference", "torch"]
TOL = dict(rtol=1e-9, atol=1e-10)


def simclr_cross_entropy(z1, z2, tau):
    """SimCLR as usually written: full 2B×2B logits, diagonal masked, cross-entropy to the other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    B = z1.shape[0]
    logits = z @ z.t() / tau
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    return F.cross_entropy(logits, target)


def supcon_loop(features, labels, tau):
    """SupCon L_out (Khosla et al. 2020, eq. 2) transcribed with Python loops; features (B, V, D)."""
    B, V, _ = features.shape
    f = F.normalize(features, dim=-1)
    anchors = [(b, v) for v in range(V) for b in range(B)]
    losses = []
    for (b, v) in anchors:
        others = [(b2, v2) for (b2, v2) in anchors if (b2, v2) != (b, v)]
        logits = torch.stack([f[b, v] @ f[b2, v2] / tau for (b2, v2) in others])
        positives = [n for n, (b2, _) in enumerate(others) if labels[b2] == labels[b]]
        if not positives:
            continue
        log_prob = logits - torch.logsumexp(logits, 0)
        losses.append(-torch.stack([log_prob[n] for n in positives]).mean())
    return torch.stack(losses).mean()


def pcl_definition(features, positions, threshold, tau):
    """PCL (Zeng et al. 2021): SupCon whose mask is |pos_i - pos_j| < threshold, self excluded."""
    B, V, D = features.shape
    f = F.normalize(features, dim=-1).transpose(0, 1).reshape(V * B, D)
    pos = positions.float().repeat(V)
    mask = ((pos[:, None] - pos[None, :]).abs() < threshold).double()
    logits = f @ f.t() / tau
    self_mask = torch.eye(V * B, dtype=torch.bool)
    logits_masked = logits.masked_fill(self_mask, float("-inf"))
    mask = mask.masked_fill(self_mask, 0)
    log_prob = logits - torch.logsumexp(logits_masked, 1, keepdim=True)
    return (-(mask * log_prob).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tau", [0.5, 0.07])
def test_nt_xent_equals_simclr_cross_entropy(impl, tau):
    z1, z2 = torch.randn(2, 12, 8, dtype=torch.float64).unbind(0)
    z1.requires_grad_(), z2.requires_grad_()
    ours = nt_xent(z1, z2, temperature=tau, impl=impl)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    theirs = simclr_cross_entropy(z1, z2, tau)
    g_theirs = torch.autograd.grad(theirs, (z1, z2))
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_sup_con_equals_loop_transcription(impl):
    feats = torch.randn(10, 2, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 4])
    ours = sup_con(feats, labels, temperature=0.1, impl=impl)
    theirs = supcon_loop(feats, labels, 0.1)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, feats)[0], torch.autograd.grad(theirs, feats)[0], **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_sup_con_single_view_anchor_without_positive_not_counted(impl):
    feats = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # anchors 4 and 5 have no positive
    per = sup_con(feats, labels, reduction="none", impl=impl)
    assert per[4] == 0 and per[5] == 0
    torch.testing.assert_close(sup_con(feats, labels, impl=impl), per[:4].mean(), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_positional_sup_con_equals_pcl_definition(impl):
    feats = torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(1, 11, (16,)) / 10.0     # slice positions (i+1)/n with n = 10: ties at 0.1
    ours = positional_sup_con(feats, positions, threshold=0.1, temperature=0.1, impl=impl)
    theirs = pcl_definition(feats, positions, 0.1, 0.1)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, feats)[0], torch.autograd.grad(theirs, feats)[0], **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce_equals_cross_entropy_with_bank(impl):
    q = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(20, 5, dtype=torch.float64)  # no grad: a memory bank
    idx = torch.randint(0, 20, (7,))
    ours = info_nce(q, bank, idx, temperature=0.2, impl=impl)
    theirs = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(bank, dim=1).t() / 0.2, idx)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(theirs, q)[0], **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_positions", [False, True])
@pytest.mark.parametrize("spatial", [(4, 5), (3, 2, 4)])
def test_dense_location_equals_loop_over_locations(impl, with_positions, spatial):
    B, C = 6, 8
    f1 = torch.randn(B, C, *spatial, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(B, C, *spatial, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 0.3])
    kw = dict(positions=positions, threshold=0.1) if with_positions else {}
    ours = dense_info_nce(f1, f2, negatives="location", temperature=0.1, impl=impl, **kw)
    a, b = f1.flatten(2), f2.flatten(2)
    per_loc = []
    for s in range(a.shape[2]):
        feats = torch.stack([a[:, :, s], b[:, :, s]], 1)   # (B, 2 views, C)
        per_loc.append(pcl_definition(feats, positions, 0.1, 0.1) if with_positions
                       else supcon_loop(feats, torch.arange(B), 0.1))
    theirs = torch.stack(per_loc).mean()
    torch.testing.assert_close(ours, theirs, **TOL)
    for x, y in zip(torch.autograd.grad(ours, (f1, f2)), torch.autograd.grad(theirs, (f1, f2))):
        torch.testing.assert_close(x, y, **TOL)


def naive_dense(f1, f2, mask, tau, batch):
    """Per-voxel cross-entropy against the same voxel of the other view, over the image or the batch."""
    B, C = f1.shape[:2]
    a = F.normalize(f1.flatten(2).transpose(1, 2), dim=-1)
    b = F.normalize(f2.flatten(2).transpose(1, 2), dim=-1)
    m = mask.flatten(1)
    losses = []
    if batch:
        a, b, m = a.reshape(1, -1, C), b.reshape(1, -1, C), m.reshape(1, -1)
    for g in range(a.shape[0]):
        logits = a[g] @ b[g].t() / tau
        logits = logits.masked_fill(~m[g][None, :], float("-inf"))
        ce = F.cross_entropy(logits, torch.arange(a.shape[1]), reduction="none")
        losses.append(ce[m[g]])
    return torch.cat(losses).mean()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_dense_image_and_batch_equal_naive_cross_entropy(impl, negatives):
    f1 = torch.randn(2, 4, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(2, 4, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 5, 2) > 0.3
    ours = dense_info_nce(f1, f2, mask, negatives=negatives, temperature=0.2, impl=impl)
    theirs = naive_dense(f1, f2, mask, 0.2, negatives == "batch")
    torch.testing.assert_close(ours, theirs, **TOL)
    sym = dense_info_nce(f1, f2, mask, negatives=negatives, temperature=0.2, impl=impl, symmetric=True)
    theirs_sym = (theirs + naive_dense(f2, f1, mask, 0.2, negatives == "batch")) / 2
    torch.testing.assert_close(sym, theirs_sym, **TOL)
    for x, y in zip(torch.autograd.grad(sym, (f1, f2)), torch.autograd.grad(theirs_sym, (f1, f2))):
        torch.testing.assert_close(x, y, **TOL)


def test_reduction_none_shapes_follow_inputs():
    f = torch.randn(3, 4, 5, 6)
    assert dense_info_nce(f, f + 0.1, reduction="none").shape == (3, 5, 6)
    assert dense_info_nce(f, f + 0.1, negatives="location", reduction="none").shape == (2, 3, 5, 6)
    per = nt_xent(torch.randn(5, 3), torch.randn(5, 3), reduction="none")
    assert per.shape == (2, 5) and (per > 0).all()
    per = sup_con(torch.randn(4, 3, 2), torch.arange(4), reduction="none")
    assert per.shape == (4, 3) and (per > 0).all()


def test_modules_match_functions_and_learn_temperature():
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    mod = NTXentLoss(temperature=0.2, learn_temperature=True)
    loss = mod(z1, z2)
    torch.testing.assert_close(loss, nt_xent(z1, z2, temperature=0.2))
    loss.backward()
    assert mod.temperature.grad is not None and torch.isfinite(mod.temperature.grad)
    feats, labels = torch.randn(6, 2, 4), torch.tensor([0, 1, 0, 1, 2, 2])
    torch.testing.assert_close(SupConLoss(0.1)(feats, labels), sup_con(feats, labels))
    pos = torch.rand(6)
    torch.testing.assert_close(PositionalSupConLoss(0.2, 0.1)(feats, pos), positional_sup_con(feats, pos, 0.2))
    f = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(DenseInfoNCELoss("batch")(f, f * 2), dense_info_nce(f, f * 2, negatives="batch"))


@pytest.mark.parametrize("loss_fn", [
    lambda impl: nt_xent(torch.randn(4, 3), torch.randn(4, 3), impl=impl),
    lambda impl: sup_con(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 2]), impl=impl),
    lambda impl: positional_sup_con(torch.randn(5, 3), torch.rand(5), 0.3, impl=impl),
    lambda impl: info_nce(torch.randn(5, 3), torch.randn(7, 3), impl=impl),
    lambda impl: dense_info_nce(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), negatives="location", impl=impl),
])
def test_auto_runs_on_cpu_and_matches_reference(loss_fn):
    torch.manual_seed(1)
    auto = loss_fn("auto")
    torch.manual_seed(1)
    ref = loss_fn("reference")
    assert torch.isfinite(auto)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-6)
