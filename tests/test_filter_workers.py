"""The Gradient Filter's "rows" tiling on tile workers (`filtered.PARALLEL`, `tile_workers.run`'s "rows"
schedule in forward and backward, per-worker dk partials) and on plain z tiles (`filtered.UNSHIFTED`): the
kept set equals a float64 brute force, and the loss and gradients equal the serial, shifted run's."""
import math

import pytest
import torch

import macl_kernels.filter.filtered as flt
import macl_kernels.eager.tile_workers as tw
from macl_kernels.filter.filtered import filtered_info_nce

pytestmark = pytest.mark.exactness   # .ci/run runs these under each MKL_CBWR code path too (issue 22)


@pytest.fixture
def two_threads(torch_threads):
    torch_threads(2)


def test_workers_keep_the_brute_force_pairs_and_match_the_serial_run(two_threads, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    N, D, rho = 2600, 8, 0.4                                       # 3 row blocks (≤ MAX_BLOCK_ROWS rows each)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    lab = torch.randint(0, 40, (N,), generator=gen)
    plans = []
    real_plan = tw.plan
    monkeypatch.setattr(tw, "plan", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    out = {}
    for name, par, uns in (("workers", True, True), ("serial_shifted", False, False)):
        monkeypatch.setattr(flt, "PARALLEL", par)
        monkeypatch.setattr(flt, "UNSHIFTED", uns)
        xg = x.clone().requires_grad_()
        res = filtered_info_nce(xg, rho=rho, q_labels=lab, exclude_self=True, temperature=0.1)
        res.loss.backward()
        out[name] = (res, xg.grad)
    assert len(plans) == 2 and all(p is not None and len(p[0]) == 2 for p in plans)   # forward and backward ran
    (a, ga), (b, gb) = out["workers"], out["serial_shifted"]                        # on two workers
    # the float64 brute force: the ⌈ρ·n⌉-th largest negative per anchor
    z = (x @ x.T) * 10
    pos = (lab[:, None] == lab[None]) & ~torch.eye(N, dtype=torch.bool)
    neg = ~pos & ~torch.eye(N, dtype=torch.bool)
    k = torch.ceil(neg.sum(1).double() * rho - 1e-9).long()
    t = z.masked_fill(~neg, -math.inf).sort(1, descending=True).values.gather(1, (k - 1)[:, None])[:, 0]
    assert torch.equal(a.kept.long(), k) and torch.allclose(a.threshold, t, rtol=0, atol=1e-12)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.pos_count, b.pos_count)
    keep = pos | (neg & (z >= t[:, None]))      # the loss over these pairs: one pair more or less shows at 1e-12
    lse = torch.logsumexp(z.masked_fill(~keep, -math.inf), 1)
    cnt = pos.sum(1)
    per = torch.where(cnt > 0, lse - (z * pos).sum(1) / cnt.clamp(min=1), torch.zeros_like(lse))
    ref = per.sum() / (cnt > 0).sum()
    assert torch.allclose(a.loss, ref, rtol=1e-12) and torch.allclose(b.loss, ref, rtol=1e-12)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_scripted_chunk_loops_equal_the_python_loops():
    """`chunk_loops`: the TorchScript forms give bit-identical results to the Python loops they come from."""
    import macl_kernels.filter.chunk_loops as cl
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 64, generator=gen)
    x[x > 1.5] = -math.inf
    hi, lo = torch.rand(40, 1, generator=gen), -torch.rand(40, 1, generator=gen)
    b = [(a, min(40, a + 16)) for a in range(0, 40, 16)]

    def run(fn_of):
        xx = x.clone()
        xs = [xx[a:e] for a, e in b]
        buf1, buf2 = torch.empty(16, 64), torch.empty(16, 64)
        b1, b2 = [buf1[:e - a] for a, e in b], [buf2[:e - a] for a, e in b]
        o1, o2, mask = torch.empty(40), torch.empty(40), torch.empty(40, 64, dtype=torch.bool)
        his, los = [hi[a:e] for a, e in b], [lo[a:e] for a, e in b]
        fn_of(cl.count2)(xs, b1, his, los, [o1[a:e] for a, e in b], [o2[a:e] for a, e in b])
        counts = o2.clone()
        fn_of(cl.members)(xs, b1, b2, his, los, [mask[a:e] for a, e in b], [o1[a:e] for a, e in b])
        fn_of(cl.exp_ge)(xs, b1, his)
        return counts, o1, mask, xx

    scripted = run(cl.get)
    assert isinstance(cl.get(cl.count2), torch.jit.ScriptFunction)
    plain = run(lambda f: f)
    for a, c in zip(scripted, plain):
        assert torch.equal(a, c)
    assert int(plain[2].sum()) == int(((x >= lo) & (x < hi)).sum()) > 0


@pytest.mark.parametrize("tiling", ["rows", "chunks"])
def test_backward_under_another_thread_count_recomputes_the_forwards_tiles(torch_threads, monkeypatch, tiling):
    """The backward recomputes the forward's tiles and keeps the pairs z ≥ t: it runs with the forward's thread
    count (then restores the caller's), since a BLAS may round a GEMM differently with another thread count
    (MKL's AVX2 path: run this under MKL_CBWR=AVX2, as the exactness CI step does). The gradient is the float64
    brute force's."""
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(tt, "KEY_BLOCK", 512)
    gen = torch.Generator().manual_seed(4)
    N, D, rho = 1500, 8, 0.4
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    lab = torch.randint(0, 30, (N,), generator=gen)
    torch_threads(2)
    xg = x.clone().requires_grad_()
    res = filtered_info_nce(xg, rho=rho, q_labels=lab, exclude_self=True, temperature=0.1, tiling=tiling)
    torch.set_num_threads(1)
    res.loss.backward()
    assert torch.get_num_threads() == 1
    xr = x.clone().requires_grad_()
    z = (xr @ xr.T) * 10
    eye = torch.eye(N, dtype=torch.bool)
    pos = (lab[:, None] == lab[None]) & ~eye
    neg = ~pos & ~eye
    k = torch.ceil(neg.sum(1).double() * rho - 1e-9).long()
    t = z.detach().masked_fill(~neg, -math.inf).sort(1, descending=True).values.gather(1, (k - 1)[:, None])[:, 0]
    keep = pos | (neg & (z.detach() >= t[:, None]))
    lse = torch.logsumexp(z.masked_fill(~keep, -math.inf), 1)
    cnt = pos.sum(1)
    ref = torch.where(cnt > 0, lse - (z * pos).sum(1) / cnt.clamp(min=1), torch.zeros_like(lse)).sum() / (cnt > 0).sum()
    ref.backward()
    assert torch.allclose(res.loss, ref, rtol=1e-12)
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-9, atol=1e-12), float((xg.grad - xr.grad).abs().max())
