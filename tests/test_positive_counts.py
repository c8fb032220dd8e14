"""|P(i)| in O(N + M) (positives.positive_counts) and dense label ids, against a brute-force N×M count."""
from __future__ import annotations

import pytest
import torch

from macl_kernels.positives import dense_label_ids, positive_counts


def brute(rule, qm, km, M, t, exclude_self, qv, kv):
    G, N = qm.shape
    if rule == "index":
        pos = torch.arange(M)[None, None, :] == qm[..., None]
    elif rule == "label":
        pos = qm[..., None] == km[:, None, :]
    else:
        pos = (qm[..., None] - km[:, None, :]).abs() < torch.tensor(t, dtype=torch.float32)
    if kv is not None:
        pos = pos & kv[:, None, :]
    if exclude_self:
        pos = pos & (torch.arange(N)[:, None] != torch.arange(M)[None, :])
    cnt = pos.sum(-1).to(torch.int32)
    return cnt if qv is None else torch.where(qv, cnt, 0)


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("N,M", [(37, 53), (53, 37), (1, 1), (20, 0)])
@pytest.mark.parametrize("exclude_self,masks", [(False, False), (True, True)])
def test_counts_match_brute_force(rule, N, M, exclude_self, masks):
    g = torch.Generator().manual_seed(N * 100 + M)
    G = 3
    if rule == "index":
        qm, km = torch.randint(0, max(M, 1), (G, N), generator=g), None
    elif rule == "label":   # labels far outside int32: the dense ids must still compare exactly
        qm = torch.randint(0, 4, (G, N), generator=g) * (2 ** 40) - 7
        km = torch.randint(0, 4, (G, M), generator=g) * (2 ** 40) - 7
    else:                   # multiples of 0.05 with threshold 0.1: ties at the threshold occur
        qm = torch.randint(0, 21, (G, N), generator=g).float() * 0.05
        km = torch.randint(0, 21, (G, M), generator=g).float() * 0.05
    qv = torch.rand(G, N, generator=g) > 0.3 if masks else None
    kv = torch.rand(G, M, generator=g) > 0.3 if masks else None
    if M == 0 and rule == "index":
        qm = torch.zeros(G, N, dtype=torch.long)
    got = positive_counts(rule, qm, km, M, threshold=0.1, exclude_self=exclude_self, q_valid=qv, k_valid=kv)
    assert got.dtype == torch.int32 and got.shape == (G, N) and got.is_contiguous()
    assert torch.equal(got, brute(rule, qm, km, M, 0.1, exclude_self, qv, kv))


def test_dense_label_ids_preserve_equality_per_group():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-3, 3, (4, 50), generator=g) * (2 ** 45)
    k = torch.randint(-3, 3, (4, 70), generator=g) * (2 ** 45)
    qi, ki = dense_label_ids(q, k)
    assert qi.dtype == ki.dtype == torch.int32
    assert torch.equal(qi[..., None] == ki[:, None, :], q[..., None] == k[:, None, :])
    assert torch.equal(qi[..., None] == qi[:, None, :], q[..., None] == q[:, None, :])
    assert int(qi.min()) >= 0 and int(max(qi.max(), ki.max())) < 120


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule"):
        positive_counts("cosine", torch.zeros(1, 2, dtype=torch.long), None, 3)
