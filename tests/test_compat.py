"""macl_kernels.compat: the peers' constructors, defaults, values and gradients.

Three kinds of check:
- the constructors accept every argument of the peer's documented signature, with the same defaults
  (signatures hard-coded below from the peers' published sources, cited);
- SupContrast's and MONAI's published forward passes are small: they are transcribed below (source URLs next to
  them) and compared in CI, float64, values and gradients, several positives per label included;
- the installed peers themselves (lightly, MONAI, pytorch-metric-learning), where importable: skipped with the
  reason otherwise (benchmarks/make_peers_env.sh makes an environment that has them).
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

from macl_kernels.compat import (LightlyNTXentLoss, MonaiContrastiveLoss, PMLNTXentLoss, PMLSupConLoss, SupContrastLoss,
                                 UnsupportedArgument)

RTOL = 1e-6

# (parameter, default) of each peer's documented constructor and forward
DOCUMENTED = {
    # https://github.com/lightly-ai/lightly/blob/master/lightly/loss/ntx_ent_loss.py
    LightlyNTXentLoss: ([("temperature", 0.5), ("memory_bank_size", 0), ("gather_distributed", False)],
                        ["out0", "out1"]),
    # https://github.com/Project-MONAI/MONAI/blob/dev/monai/losses/contrastive.py
    MonaiContrastiveLoss: ([("temperature", 0.5), ("batch_size", -1)], ["input", "target"]),
    # https://github.com/KevinMusgrave/pytorch-metric-learning/blob/master/src/pytorch_metric_learning/losses/ntxent_loss.py
    # (temperature=0.07, **kwargs); kwargs of BaseMetricLossFunction: collect_stats, reducer, distance,
    # embedding_regularizer, embedding_reg_weight
    PMLNTXentLoss: ([("temperature", 0.07)], ["embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels"]),
    # .../losses/supcon_loss.py: (temperature=0.1, **kwargs), the same forward as every PML loss
    PMLSupConLoss: ([("temperature", 0.1)], ["embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels"]),
    # https://github.com/HobbitLong/SupContrast/blob/master/losses.py
    SupContrastLoss: ([("temperature", 0.07), ("contrast_mode", "all"), ("base_temperature", 0.07)],
                      ["features", "labels", "mask"]),
}


@pytest.mark.parametrize("cls", list(DOCUMENTED), ids=lambda c: c.__name__)
def test_constructor_and_forward_match_the_documented_signature(cls):
    init, fwd = DOCUMENTED[cls]
    params = inspect.signature(cls.__init__).parameters
    for name, default in init:
        assert name in params, f"{cls.__name__} lacks {name}"
        assert params[name].default == default, (name, params[name].default, default)
    cls(*[d for _, d in init])                      # positionally, in the peer's order
    cls(**dict(init))                               # and by keyword
    assert [p for p in inspect.signature(cls.forward).parameters if p != "self"][:len(fwd)] == fwd


def test_pml_kwargs_accepted_or_refused_with_reason():
    PMLNTXentLoss(0.07, collect_stats=True, reducer=None, distance=None, embedding_regularizer=None,
                  embedding_reg_weight=1)

    class WeirdReducer:
        pass
    with pytest.raises(NotImplementedError, match="MeanReducer"):
        PMLNTXentLoss(reducer=WeirdReducer())
    with pytest.raises(TypeError, match="reducer=WeirdReducer"):            # also a TypeError (issue 22)
        PMLNTXentLoss(reducer=WeirdReducer())
    with pytest.raises(TypeError, match="unexpected"):
        PMLNTXentLoss(foo=1)
    x = torch.randn(6, 4)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        PMLNTXentLoss()(x, torch.arange(3).repeat(2), indices_tuple=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="labels are required"):
        PMLNTXentLoss()(x)


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=RTOL, atol=1e-12)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-10)


# ------------------------------------------------------------------ transcriptions of the published code

def supcontrast_reference(features, labels=None, mask=None, temperature=0.07, contrast_mode="all",
                          base_temperature=0.07):
    """Transcribed from https://github.com/HobbitLong/SupContrast/blob/master/losses.py (SupConLoss.forward)."""
    device = features.device
    if len(features.shape) > 3:
        features = features.view(features.shape[0], features.shape[1], -1)
    batch_size = features.shape[0]
    if labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float32).to(device)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float().to(device)
    else:
        mask = mask.float().to(device)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(batch_size * anchor_count).view(-1, 1).to(device), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def monai_reference(input, target, temperature=0.5):
    """Transcribed from https://github.com/Project-MONAI/MONAI/blob/dev/monai/losses/contrastive.py
    (ContrastiveLoss.forward, MONAI 1.3-1.6)."""
    temperature_tensor = torch.as_tensor(temperature).to(input.device)
    batch_size = input.shape[0]
    negatives_mask = ~torch.eye(batch_size * 2, batch_size * 2, dtype=torch.bool)
    negatives_mask = torch.clone(negatives_mask.type(torch.float)).to(input.device)
    repr = torch.cat([input, target], dim=0)
    sim_matrix = F.cosine_similarity(repr.unsqueeze(1), repr.unsqueeze(0), dim=2)
    sim_ij = torch.diag(sim_matrix, batch_size)
    sim_ji = torch.diag(sim_matrix, -batch_size)
    positives = torch.cat([sim_ij, sim_ji], dim=0)
    nominator = torch.exp(positives / temperature_tensor)
    denominator = negatives_mask * torch.exp(sim_matrix / temperature_tensor)
    loss_partial = -torch.log(nominator / torch.sum(denominator, dim=1))
    return torch.sum(loss_partial) / (2 * batch_size)


def pml_ntxent_naive(embeddings, labels, temperature=0.07):
    """PML NT-Xent's definition written pair by pair (docs: 'pytorch-metric-learning losses NTXentLoss'):
    mean over positive pairs (a, p) of -log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n: y_n ≠ y_a} e^{s_an/τ})), cosine s."""
    x = F.normalize(embeddings, dim=1)
    s = x @ x.T / temperature
    terms = []
    for a in range(len(labels)):
        neg = s[a][labels != labels[a]]
        for p in range(len(labels)):
            if p != a and labels[p] == labels[a]:
                terms.append(torch.logsumexp(torch.cat([s[a, p:p + 1], neg]), 0) - s[a, p])
    return torch.stack(terms).mean()


def lightly_bank_naive(out0, out1, bank, temperature):
    """lightly NTXentLoss with a memory bank (the MoCo branch of ntx_ent_loss.py), bank (K, D)."""
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long))


# ----------------------------------------------------------------------------------- CI comparisons

def _features(B=10, V=2, D=16, seed=0, normalized=True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, V, D, generator=g, dtype=torch.float64)
    return F.normalize(f, dim=-1) if normalized else f


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("case", ["labels_several_positives", "no_labels", "mask", "singletons", "4d"])
@pytest.mark.parametrize("tau,base", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_supcontrast_matches_transcription(mode, case, tau, base):
    f = _features(V=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 0, 1])   # several positives per label, one singleton class
    kw, ref_kw = {}, {}
    if case == "labels_several_positives":
        kw = ref_kw = {"labels": labels}
    elif case == "mask":
        m = (labels[:, None] == labels[None, :]).float()
        kw = ref_kw = {"mask": m}
    elif case == "singletons":   # V=1 with unique labels: anchors without positive still count in the mean
        f = f[:, :1]
        kw = ref_kw = {"labels": torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8])}
    elif case == "4d":
        f = _features(V=2, D=12).reshape(10, 2, 3, 4)
        kw = ref_kw = {"labels": labels}
    ours = SupContrastLoss(tau, mode, base, impl="torch")
    _assert_same(_grads(lambda x: ours(x, **kw), f),
                 _grads(lambda x: supcontrast_reference(x, temperature=tau, contrast_mode=mode,
                                                        base_temperature=base, **ref_kw), f))


def test_supcontrast_refuses_a_mask_that_is_not_classes():
    f = _features(B=4)
    partial = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    with pytest.raises(ValueError, match="same-class relation"):
        SupContrastLoss()(f, mask=partial)
    with pytest.raises(ValueError, match="weighted"):
        SupContrastLoss()(f, mask=torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match="Cannot define both"):
        SupContrastLoss()(f, labels=torch.arange(4), mask=torch.eye(4))
    with pytest.raises(ValueError, match="Unknown mode"):
        SupContrastLoss(contrast_mode="many")


@pytest.mark.parametrize("tau", [0.5, 0.1, 1.0])
def test_monai_matches_transcription(tau):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(9, 7, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    ours = MonaiContrastiveLoss(tau, impl="torch")
    _assert_same(_grads(ours, x, y), _grads(lambda a, b: monai_reference(a, b, tau), x, y))
    with pytest.raises(ValueError, match="greater than 2"):
        ours(x[None], y[None])
    with pytest.warns(UserWarning, match="batch_size"):
        MonaiContrastiveLoss(batch_size=9)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 0, 1, 2, 3],              # two views (SimCLR)
                                    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3],        # several positives, uneven
                                    [5, 5, 7, 7, 7, 9]])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_pml_ntxent_matches_pair_by_pair_definition(labels, tau):
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    ours = PMLNTXentLoss(tau, impl="torch")
    _assert_same(_grads(lambda e: ours(e, labels), x), _grads(lambda e: pml_ntxent_naive(e, labels, tau), x))


def test_pml_ntxent_with_no_negatives_is_zero():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = PMLNTXentLoss()(x, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0


def test_lightly_without_bank_is_simclr_and_with_bank_is_moco():
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2))
    _assert_same(_grads(LightlyNTXentLoss(0.5, impl="torch"), x, y),
                 _grads(lambda a, b: monai_reference(a, b, 0.5), x, y))   # SimCLR NT-Xent, same definition
    moco = LightlyNTXentLoss(0.2, memory_bank_size=12, impl="torch")
    moco(x.float(), y.float())          # first call makes the bank; out0 does not require grad: no update
    bank0 = moco.bank.clone()
    assert moco.bank_ptr == 0
    moco.bank = moco.bank.double()
    _assert_same(_grads(moco, x, y), _grads(lambda a, b: lightly_bank_naive(a, b, bank0.double(), 0.2), x, y))
    # the update: out1 (normalised) entered the bank at rows 0..7
    torch.testing.assert_close(moco.bank[:8], F.normalize(y, dim=1))
    assert moco.bank_ptr == 8
    with pytest.raises(ValueError, match="Illegal temperature"):
        LightlyNTXentLoss(temperature=0.0)


# ------------------------------------------------------------------------------------ against the peers

def _peer(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:   # ImportError, or a broken install (torchvision beside another torch)
        pytest.skip(f"{module} not importable here ({type(e).__name__}); the peers environment has it "
                    f"(benchmarks/make_peers_env.sh)")


def test_peer_lightly():
    loss = _peer("lightly.loss")
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(11, 6, generator=g, dtype=torch.float64) for _ in range(2))
    peer = loss.NTXentLoss()
    assert peer.temperature == LightlyNTXentLoss().temperature
    for tau in (0.5, 0.1):
        _assert_same(_grads(LightlyNTXentLoss(tau, impl="torch"), x, y), _grads(loss.NTXentLoss(tau), x, y))
    # memory bank (lightly ≥ 1.5 wants (K, D)): copy the peer's random bank, compare the updating call
    peer, ours = loss.NTXentLoss(0.2, memory_bank_size=(16, 6)), LightlyNTXentLoss(0.2, (16, 6), impl="torch")
    module = getattr(peer, "memory_bank", peer)
    module.bank = module.bank.double()
    ours.bank = module.bank.detach().clone()
    _assert_same(_grads(ours, x, y), _grads(peer, x, y))
    torch.testing.assert_close(ours.bank, module.bank)          # the same FIFO update
    assert ours.bank_ptr == int(module.bank_ptr)


def test_peer_monai():
    losses = _peer("monai.losses")
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert losses.ContrastiveLoss().temperature == MonaiContrastiveLoss().temperature
    for tau in (0.5, 0.07):
        _assert_same(_grads(MonaiContrastiveLoss(tau, impl="torch"), x, y),
                     _grads(losses.ContrastiveLoss(temperature=tau), x, y))


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 1]])
def test_peer_pml_ntxent(labels):
    losses = _peer("pytorch_metric_learning.losses")
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert losses.NTXentLoss().temperature == PMLNTXentLoss().temperature
    for tau in (0.07, 0.5):
        _assert_same(_grads(lambda e: PMLNTXentLoss(tau, impl="torch")(e, labels), x),
                     _grads(lambda e: losses.NTXentLoss(tau)(e, labels), x))


def test_peer_pml_supcon_is_sup_con():
    """PML's SupConLoss was already a drop-in for macl_kernels.sup_con (issue 14): keep it so."""
    losses = _peer("pytorch_metric_learning.losses")
    from macl_kernels import sup_con
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _assert_same(_grads(lambda e: sup_con(e, labels, temperature=0.1, impl="torch"), x),
                 _grads(lambda e: losses.SupConLoss(temperature=0.1)(e, labels), x))


# ------------------------------------------------------------------------- PML SupCon: every call form

def _pml_supcon_pair(tau=0.1, **kw):
    losses = _peer("pytorch_metric_learning.losses")
    return PMLSupConLoss(tau, impl="torch", **kw), losses.SupConLoss(tau, **kw)


def _emb(n, d=8, seed=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _both(ours, peer, *tensors, **kw):
    """Values and gradients (float64) of ours(*tensors, **kw) and peer(...); a gradient PML leaves None is 0."""
    out = []
    for fn in (ours, peer):
        xs = [t.detach().clone().requires_grad_(True) for t in tensors]
        loss = fn(*xs, **kw)
        grads = torch.autograd.grad(loss, xs, allow_unused=True) if loss.requires_grad else [None] * len(xs)
        out.append((loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]))
    return out


PML_LABELS = {
    "several_positives": [0, 0, 0, 1, 1, 2, 2, 2, 2, 3],     # label 3: an anchor without positive
    "two_views": [0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
    "one_class": [7] * 10,                                    # PML: no negative pair at all, 0.0
    "all_distinct": list(range(10)),                          # no positive pair, 0.0
    "one_pair_no_negative": [3, 3],
    "float": [0.5, 0.5, 1.25, 1.25, 1.25, -2.0, -2.0, 0.5, 3.0, 1.25],
    "bool": [True, False, True, True, False, False, True, False, True, True],
}


@pytest.mark.parametrize("case", list(PML_LABELS))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_peer_pml_supcon_labels(case, tau):
    """(emb, labels) and (emb, labels, None) against the installed PML: one class, distinct labels, float and bool
    labels included; float64 values and gradients."""
    ours, peer = _pml_supcon_pair(tau)
    lab = torch.tensor(PML_LABELS[case])
    x = _emb(len(lab))
    (lo, go), (lp, gp) = _both(ours, peer, x, labels=lab)
    _assert_same((lo, go), (lp, gp))
    assert lo.dtype == torch.float64
    if case in ("one_class", "all_distinct", "one_pair_no_negative"):
        assert lo.item() == 0.0 and go[0].abs().max().item() == 0.0
    (lo3, go3), (lp3, gp3) = _both(lambda e: ours(e, lab, None), lambda e: peer(e, lab, None), x)
    _assert_same((lo3, go3), (lp, gp))
    _assert_same((lp3, gp3), (lp, gp))


def test_peer_pml_supcon_one_class_differs_from_sup_con():
    """The issue-22 case: one class in the batch: PML 0.0, PMLSupConLoss 0.0, this package's SupConLoss not."""
    from macl_kernels import SupConLoss
    ours, peer = _pml_supcon_pair(0.1)
    x, lab = _emb(10), torch.zeros(10, dtype=torch.long)
    assert peer(x, lab).item() == 0.0 and ours(x, lab).item() == 0.0
    assert SupConLoss(0.1)(x, lab).item() > 1.0


@pytest.mark.parametrize("form", ["ref_labels", "ref_labels_one_class", "no_ref_labels_m_eq_n", "no_ref_labels_m_gt_n",
                                  "ref_labels_is_labels", "ref_labels_only", "one_pos_one_neg"])
def test_peer_pml_supcon_reference_set(form):
    """ref_emb / ref_labels in each form PML accepts, gradients to embeddings and ref_emb."""
    ours, peer = _pml_supcon_pair(0.2)
    lab = torch.tensor([0, 0, 1, 1, 2, 3, 3, 1])
    x, r = _emb(8), _emb(11, seed=9)
    ref_lab = torch.tensor([0, 1, 1, 3, 2, 5, 0, 0, 1, 4, 3])

    def with_ref(e, f, labels, **kw):
        return _both(lambda a, b: ours(a, labels, ref_emb=b, **kw), lambda a, b: peer(a, labels, ref_emb=b, **kw), e, f)

    if form == "ref_labels":
        pair = with_ref(x, r, lab, ref_labels=ref_lab)
        assert pair[0][1][1].abs().sum() > 0              # the reference rows get a gradient
    elif form == "ref_labels_one_class":
        pair = with_ref(x, r, torch.zeros(8, dtype=torch.long), ref_labels=torch.zeros(11, dtype=torch.long))
        assert pair[0][0].item() == 0.0 == pair[1][0].item()
    elif form == "no_ref_labels_m_eq_n":                  # ref row j takes labels[j]; the pair (i, i) is excluded
        pair = with_ref(x, r[:8], lab)
    elif form == "no_ref_labels_m_gt_n":                  # only the first N ref rows take part
        pair = with_ref(x, r, lab)
        assert pair[0][1][1][8:].abs().max() == 0 and pair[1][1][1][8:].abs().max() == 0
    elif form == "ref_labels_is_labels":                  # PML tests identity: the same object excludes (i, i)
        pair = with_ref(x, r[:8], lab, ref_labels=lab)
    elif form == "ref_labels_only":                       # ignored without ref_emb, as PML
        pair = _both(lambda e: ours(e, lab, ref_labels=torch.arange(8)),
                     lambda e: peer(e, lab, ref_labels=torch.arange(8)), x)
    else:                                                 # PML: at most one positive and one negative pair: 0
        pair = with_ref(x[:1], r[:2], lab[:1], ref_labels=torch.tensor([0, 1]))
        assert pair[0][0].item() == 0.0 == pair[1][0].item()
    _assert_same(*pair)


def test_peer_pml_supcon_fewer_ref_rows_than_labels_says_why():
    ours, peer = _pml_supcon_pair(0.1)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(IndexError):
        peer(_emb(6), lab, ref_emb=_emb(4))
    with pytest.raises(ValueError, match="ref_labels"):
        ours(_emb(6), lab, ref_emb=_emb(4))


def test_peer_pml_supcon_reducers_and_distances():
    reducers = _peer("pytorch_metric_learning.reducers")
    distances = _peer("pytorch_metric_learning.distances")
    lab = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    x = _emb(10) * 0.3
    for kw in (dict(reducer=reducers.MeanReducer()), dict(reducer=reducers.AvgNonZeroReducer()),
               dict(distance=distances.CosineSimilarity()),
               dict(distance=distances.DotProductSimilarity(normalize_embeddings=False)),
               dict(distance=distances.DotProductSimilarity(), reducer=reducers.MeanReducer()),
               dict(collect_stats=True, embedding_reg_weight=3.0)):
        ours, peer = _pml_supcon_pair(0.5, **kw)
        _assert_same(*_both(ours, peer, x, labels=lab))


def test_pml_unsupported_keywords_are_type_errors_that_name_them():
    """Every peer keyword the core cannot reproduce: a TypeError naming it and saying what to do (issue 22)."""
    reducers = _peer("pytorch_metric_learning.reducers")
    distances = _peer("pytorch_metric_learning.distances")
    regularizers = _peer("pytorch_metric_learning.regularizers")
    for cls in (PMLSupConLoss, PMLNTXentLoss):
        for kw, name in ((dict(reducer=reducers.SumReducer()), "reducer=SumReducer"),
                         (dict(reducer=reducers.ThresholdReducer(low=0.5)), "reducer=ThresholdReducer"),
                         (dict(distance=distances.LpDistance()), "distance=LpDistance"),
                         (dict(distance=distances.CosineSimilarity(power=2)), "distance=CosineSimilarity"),
                         (dict(embedding_regularizer=regularizers.LpRegularizer()), "embedding_regularizer"),
                         (dict(margin=0.1), "margin")):
            with pytest.raises(TypeError, match=name) as err:
                cls(**kw)
            assert " use " in str(err.value) or "PML's loss kwargs are" in str(err.value), str(err.value)
        x, lab = _emb(6), torch.tensor([0, 0, 1, 1, 2, 2])
        with pytest.raises(TypeError, match="indices_tuple") as err:
            cls()(x, lab, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
        assert isinstance(err.value, UnsupportedArgument) and isinstance(err.value, NotImplementedError)
        with pytest.raises(ValueError, match="labels"):
            cls()(x)
    with pytest.raises(ValueError, match="cannot both be None"):
        _peer("pytorch_metric_learning.losses").SupConLoss()(_emb(4))   # PML refuses the call without labels too
    with pytest.raises(ValueError, match="1D"):
        PMLSupConLoss()(_emb(6), torch.zeros(6, 1))


@pytest.mark.parametrize("cls", [PMLNTXentLoss, PMLSupConLoss])
def test_pml_half_inputs_give_a_float32_loss_at_float32_accuracy(cls):
    """Issue 22 item 8: float16 embeddings give a float32 loss (the core's policy, docs/precision.md), as close
    to the float64 loss of the same float16 values as float32 statistics allow (PMLNTXentLoss returned a float16
    loss before, 0.023 off in the issue's example)."""
    lab = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 4, 0, 2])
    x16 = (_emb(12, 16) * 2).half()
    loss = cls(0.07, impl="torch")(x16, lab)
    assert loss.dtype == torch.float32
    ref = cls(0.07, impl="torch")(x16.double(), lab)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    x = x16.clone().requires_grad_(True)
    cls(0.07, impl="torch")(x, lab).backward()
    xd = x16.double().requires_grad_(True)
    cls(0.07, impl="torch")(xd, lab).backward()
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------- dtype casts of the loss modules (issue 22)

def test_half_or_double_on_a_loss_module_keeps_a_fixed_temperature():
    """`.half()` / `.double()` / `.to(dtype)` on a loss module must not round a fixed τ (float16 made 0.1 into
    0.09998); a learnable τ is a parameter and is cast like any other. The compat classes hold τ as a float."""
    from macl_kernels import DenseInfoNCELoss, InfoNCELoss, NTXentLoss, PositionalSupConLoss, SupConLoss
    x, y = _emb(12, 6), _emb(12, 6, seed=1)
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3])
    for make, call in ((lambda: NTXentLoss(0.1), lambda m: m(x, y)), (lambda: SupConLoss(0.1), lambda m: m(x, lab)),
                       (lambda: InfoNCELoss(0.1), lambda m: m(x, y))):
        ref = call(make())
        for cast in (lambda m: m.half(), lambda m: m.double(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
            m = cast(make())
            assert m.temperature.dtype == torch.float32 and float(m.temperature) == float(torch.tensor(0.1))
            assert torch.equal(call(m), ref)
    for cls in (PositionalSupConLoss, DenseInfoNCELoss):
        assert cls(temperature=0.1).half().temperature.dtype == torch.float32
    learn = NTXentLoss(0.1, learn_temperature=True).half()
    assert learn.temperature.dtype == torch.float16                  # a parameter: cast with the module
    for m in (PMLSupConLoss(0.1), PMLNTXentLoss(0.1), LightlyNTXentLoss(0.1), MonaiContrastiveLoss(0.1),
              SupContrastLoss(0.1)):
        assert m.half().temperature == 0.1
