"""The symmetric self-contrast tiling (macl_kernels/eager/self_tiles.py) against the float64 reference."""
import pytest
import torch

import macl_kernels.eager.self_tiles as st
import macl_kernels.eager.tile_workers as tw
import macl_kernels.eager.dense as td
import macl_kernels.eager.tiled as tt
from core_cases import assert_matches_truth, make_case, run


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8])
def test_tournament_covers_every_pair_once_with_disjoint_rounds(n):
    rounds = tw.tournament(n)
    pairs = [pq for r in rounds for pq in r]
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(a, n)]
    for r in rounds:
        blocks = [x for a, b in r for x in ({a, b})]
        assert len(blocks) == len(set(blocks)), f"round {r} reuses a block"


@pytest.fixture
def symmetric(monkeypatch):
    """Tiled path with positives outside the tiles, small symmetric blocks (ragged), and a record of which
    tiling ran."""
    monkeypatch.setattr(td, "DENSE_MAX_BYTES", -1)
    monkeypatch.setattr(tt, "IN_TILE_MAX_KEYS", 0)
    monkeypatch.setattr(st, "SELF_BLOCK", 16)
    ran = []
    real = st.forward_sums
    monkeypatch.setattr(st, "forward_sums", lambda *a: ran.append(True) or real(*a))
    return ran


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_tiles_match_reference(symmetric, rule, normalize, dtype):
    """k is q (exclude_self), G = 3, N = 45 (three 16-blocks, the last ragged), learnable τ, anchor mask."""
    case = make_case(rule, G=3, N=45, M=45, D=12, self_contrast=True, seed=31)
    case["kw"]["q_valid"] = torch.rand(3, 45, generator=torch.Generator().manual_seed(2)) > 0.2
    truth = run("reference", case, torch.float64, 0.1, normalize=normalize)
    low = run("reference", case, dtype, 0.1, normalize=normalize) if dtype != torch.float64 else None
    got = run("torch", case, dtype, 0.1, normalize=normalize)
    assert_matches_truth(got, truth, low, dtype, f"{rule} normalize={normalize}")
    assert symmetric, "the symmetric tiling did not run"


@pytest.mark.parametrize("learn_tau", [True, False])
@pytest.mark.parametrize("workers", [True, False])
def test_symmetric_tiles_with_and_without_workers(symmetric, monkeypatch, torch_threads, learn_tau, workers):
    """Without a τ gradient the two gradient contributions merge into one buffer; with workers the rounds run
    in parallel (two intra-op threads)."""
    monkeypatch.setattr(tw, "PARALLEL_TILES", workers)
    torch_threads(2)
    case = make_case("label", G=2, N=70, M=70, D=8, self_contrast=True, seed=5)
    truth = run("reference", case, torch.float64, 0.2, learn_tau=learn_tau, normalize=True)
    got = run("torch", case, torch.float64, 0.2, learn_tau=learn_tau, normalize=True)
    assert_matches_truth(got, truth, None, torch.float64, f"learn_tau={learn_tau} workers={workers}")
    assert symmetric


def test_no_exclude_self_and_the_cases_that_take_the_general_tiling(symmetric):
    """Without exclude_self the diagonal stays in; a key mask, or distinct q and k, take the general tiling."""
    case = make_case("label", G=1, N=40, M=40, D=6, self_contrast=True, seed=9)
    case["kw"]["exclude_self"] = False
    truth = run("reference", case, torch.float64, 0.1, normalize=True)
    got = run("torch", case, torch.float64, 0.1, normalize=True)
    assert_matches_truth(got, truth, None, torch.float64, "exclude_self=False")
    assert len(symmetric) == 1
    masked = make_case("label", G=1, N=40, M=40, D=6, self_contrast=True, masks=True, seed=9)
    run("torch", masked, torch.float64, 0.1, normalize=True)
    other = make_case("label", G=1, N=40, M=40, D=6, self_contrast=False, seed=9)
    run("torch", other, torch.float64, 0.1, normalize=True)
    assert len(symmetric) == 1, "key masks / distinct keys must not take the symmetric tiling"
