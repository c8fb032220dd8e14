"""Tile-parallel execution of the torch path (macl_kernels/eager/tile_workers.py): the schedule and the results."""
import itertools

import pytest
import torch

import macl_kernels.eager.tile_workers as tw
import macl_kernels.eager.dense as td
import macl_kernels.eager.tiled as tt
from macl_kernels import grouped_info_nce


@pytest.fixture
def threads(torch_threads):
    """Run with T intra-op threads (restored afterwards; conftest.torch_threads)."""
    return torch_threads


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("G, N, M, rb, kb", [(1, 2048, 2048, 512, 1024), (1, 1000, 1537, 128, 256),
                                              (5, 40, 30, 16, 8), (12, 16, 16, 512, 1024)])
def test_plan_visits_every_tile_once_and_workers_never_share_a_block(threads, monkeypatch, T, G, N, M, rb, kb):
    threads(T)
    monkeypatch.setattr(tt, "ROW_BLOCK", rb)
    monkeypatch.setattr(tt, "KEY_BLOCK", kb)
    tiles = list(tt.tiles(G, N, M))
    n_rb, n_cb = len({(t[0], t[2]) for t in tiles}), len({(t[0], t[4]) for t in tiles})
    for kind in ("rows", "latin"):
        phases = tw.plan(tiles, kind)
        if n_rb < T or (kind == "latin" and n_cb < T):
            assert phases is None, kind
            continue
        assert phases is not None, kind
        visited = [t for phase in phases for mine in phase for t in mine]
        assert sorted(visited) == sorted(tiles)
        for phase in phases:
            assert len(phase) == T
            for a, b in itertools.combinations(range(T), 2):
                rows_a = {(t[0], t[2]) for t in phase[a]}
                rows_b = {(t[0], t[2]) for t in phase[b]}
                assert not rows_a & rows_b, "two workers write the same rows"
                if kind == "latin":
                    keys_a = {(t[0], t[4]) for t in phase[a]}
                    keys_b = {(t[0], t[4]) for t in phase[b]}
                    assert not keys_a & keys_b, "two workers write the same key rows"


def test_plan_is_serial_where_workers_cannot_pay(threads, monkeypatch):
    tiles = list(tt.tiles(1, 512, 4096))   # one row block
    threads(2)
    assert tw.plan(tiles, "rows") is None and tw.plan(tiles, "latin") is None
    threads(1)
    assert tw.plan(list(tt.tiles(1, 4096, 4096)), "latin") is None
    threads(2)
    assert tw.plan(list(tt.tiles(1, 4096, 4096)), "latin", torch.device("meta")) is None   # CPU only
    monkeypatch.setattr(tw, "PARALLEL_TILES", False)
    assert tw.plan(list(tt.tiles(1, 4096, 4096)), "latin") is None


@pytest.mark.parametrize("rule", ["index", "label"])
@pytest.mark.parametrize("in_tile", [False, True])
def test_workers_match_the_serial_loop(threads, monkeypatch, rule, in_tile):
    """Values and gradients (q, k, τ) with 2 workers equal the serial loop's to float32 rounding; normalize,
    self-exclusion and masked keys included."""
    monkeypatch.setattr(td, "DENSE_MAX_BYTES", -1)
    monkeypatch.setattr(tt, "IN_TILE_MAX_KEYS", 1 << 30 if in_tile else 0)
    monkeypatch.setattr(tt, "ROW_BLOCK", 64)
    monkeypatch.setattr(tt, "KEY_BLOCK", 96)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 300, 32, generator=gen)
    labels = torch.randint(0, 7, (2, 300), generator=gen)
    k_valid = torch.rand(2, 300, generator=gen) > 0.1
    kw = dict(q_labels=labels) if rule == "label" else {}

    def run():
        qq = q.clone().requires_grad_()
        tau = torch.tensor(0.1, requires_grad=True)
        out = grouped_info_nce(qq, temperature=tau, exclude_self=True, k_valid=k_valid, normalize=True,
                               impl="torch", reduction="none", **kw)
        (out.per_anchor * torch.linspace(0.5, 1.5, 300)).sum().backward()
        return out.per_anchor.detach(), qq.grad, tau.grad

    threads(2)
    calls = []
    real = tw.plan
    monkeypatch.setattr(tw, "plan", lambda *a: calls.append(real(*a)) or calls[-1])
    par = run()
    assert calls and all(c is not None for c in calls), "the workers did not run"
    monkeypatch.setattr(tw, "PARALLEL_TILES", False)
    ser = run()
    for a, b in zip(par, ser):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_worker_error_reaches_the_caller_and_threads_are_restored(threads):
    threads(2)
    tiles = list(tt.tiles(1, 4096, 4096))

    def body(state, t):
        if t[2] == 512:
            raise RuntimeError("tile failed")

    with pytest.raises(RuntimeError, match="tile failed"):
        tw.run(tiles, "latin", lambda: None, body)
    assert torch.get_num_threads() == 2


def test_concurrent_callers_leave_the_thread_count_as_it_was(threads):
    """Two Python threads computing losses at once: the intra-op thread count ends where it started."""
    import threading
    threads(2)
    q = torch.randn(4096, 16)
    k = torch.randn(4096, 16)
    errors = []

    def loss():
        try:
            for _ in range(3):
                grouped_info_nce(q, k, impl="torch")
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=loss) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert torch.get_num_threads() == 2

