"""Empty batches (issue 13, item 10): every loss returns 0 with zero gradients, on every implementation
that runs here, like the reference; reduction="none" returns an empty per-anchor tensor."""
import pytest
import torch

import macl_kernels as mk

IMPLS = ["torch", "reference", "auto"]


def _check(loss, *inputs, tau=None):
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    loss.backward()
    for x in inputs:
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    if tau is not None:
        assert tau.grad is not None and float(tau.grad) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", [True, False])
def test_image_level_losses(impl, normalize):
    tau = torch.tensor(0.1, requires_grad=True)
    z1, z2 = torch.randn(0, 16, requires_grad=True), torch.randn(0, 16, requires_grad=True)
    _check(mk.nt_xent(z1, z2, temperature=tau, impl=impl, normalize=normalize), z1, z2, tau=tau)
    f = torch.randn(0, 2, 16, requires_grad=True)
    _check(mk.sup_con(f, torch.zeros(0, dtype=torch.long), impl=impl, normalize=normalize), f)
    f = torch.randn(0, 2, 16, requires_grad=True)
    _check(mk.positional_sup_con(f, torch.zeros(0), 0.1, impl=impl, normalize=normalize), f)
    q, k = torch.randn(0, 16, requires_grad=True), torch.randn(0, 16, requires_grad=True)
    _check(mk.info_nce(q, k, impl=impl, normalize=normalize), q, k)
    q, k = torch.randn(0, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)   # no anchors
    _check(mk.info_nce(q, k, impl=impl, normalize=normalize), q, k)
    per = mk.nt_xent(torch.randn(0, 16), torch.randn(0, 16), impl=impl, reduction="none")
    assert per.shape == (2, 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("negatives", ["image", "batch", "location"])
def test_dense_losses_with_no_image(impl, negatives):
    f1, f2 = torch.randn(0, 4, 3, 5, requires_grad=True), torch.randn(0, 4, 3, 5, requires_grad=True)
    _check(mk.dense_info_nce(f1, f2, negatives=negatives, impl=impl), f1, f2)
    f1, f2 = torch.randn(0, 4, 3, 5, requires_grad=True), torch.randn(0, 4, 3, 5, requires_grad=True)
    kw = dict(symmetric=True) if negatives != "location" else dict(positions=torch.zeros(0), threshold=0.1)
    _check(mk.dense_info_nce(f1, f2, negatives=negatives, impl=impl, **kw), f1, f2)
    none = mk.dense_info_nce(torch.randn(0, 4, 3, 5), torch.randn(0, 4, 3, 5), negatives=negatives, impl=impl,
                             reduction="none")
    assert none.numel() == 0


def test_dense_loss_with_no_channels_names_them():
    with pytest.raises(ValueError, match="C = 0"):
        mk.dense_info_nce(torch.randn(2, 0, 3, 3), torch.randn(2, 0, 3, 3))


@pytest.mark.parametrize("impl", IMPLS)
def test_core_with_empty_groups_or_keys(impl):
    q = torch.randn(0, 4, 8, requires_grad=True)          # G = 0
    r = mk.grouped_info_nce(q, impl=impl, exclude_self=True, normalize=True)
    _check(r.loss, q)
    q = torch.randn(3, 8, requires_grad=True)              # anchors, but every key masked out
    k = torch.randn(0, 8, requires_grad=True)
    r = mk.grouped_info_nce(q, k, q_labels=torch.zeros(3, dtype=torch.long), k_labels=torch.zeros(0, dtype=torch.long),
                            impl=impl)
    _check(r.loss, q, k)
    assert torch.isinf(r.lse).all() and (r.pos_count == 0).all()


def test_modules_on_empty_batch():
    loss = mk.NTXentLoss(learn_temperature=True)
    z = torch.randn(0, 8, requires_grad=True)
    out = loss(z, z)
    _check(out, z, tau=loss.temperature)
