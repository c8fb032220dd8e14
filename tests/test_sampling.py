"""ARCO's samplers (macl.semi.sampling) on fixed synthetic fields, over many seeded draws.

The field has class-dependent means (so strata differ), a smooth spatial trend and noise; the "truth" is the
plain average of the field over the candidates. Every check below would fail for a sampler that favours some
strata, mis-allocates, or reflects across strata.
"""
import math

import pytest
import torch

from macl.semi.sampling import (SAMPLERS, allocate, grid_cells, sample, sample_index_grid, stratum_ids, unit_coords)

DRAWS = 400


# one torch thread (tests/conftest.py): these runs are tiny
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_field(shape):
    """(coords (N, d), labels (N,), values (N,)) for a fixed field over `shape` (2D or 3D)."""
    g = torch.Generator().manual_seed(1234)
    n = math.prod(shape)
    coords = unit_coords(torch.arange(n), shape)
    centre = torch.full((len(shape),), 0.5, dtype=torch.float64)
    r = (coords - centre).norm(dim=1)
    labels = (r < 0.22).long() * 2 + ((r >= 0.22) & (r < 0.38)).long()       # 2 inside, 1 ring, 0 outside
    means = torch.tensor([0.0, 4.0, 9.0], dtype=torch.float64)
    values = means[labels] + 3.0 * coords[:, 0] + torch.randn(n, generator=g, dtype=torch.float64)
    return coords, labels, values


def estimates(kind, coords, values, n, grid, labels=None, draws=DRAWS, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [values[sample(kind, coords, n, grid, g, labels=labels).index].mean() for _ in range(draws)]
    return torch.stack(out)


@pytest.mark.parametrize("shape,grid", [((48, 48), 4), ((16, 16, 16), 2)], ids=["2d", "3d"])
def test_sg_is_unbiased_and_beats_naive_variance(shape, grid):
    coords, labels, values = make_field(shape)
    truth = values.mean()
    ns = estimates("ns", coords, values, 64, grid, labels)
    sg = estimates("sg", coords, values, 64, grid, labels)
    for name, est in (("ns", ns), ("sg", sg)):
        se = est.std() / math.sqrt(DRAWS)
        assert abs(est.mean() - truth) < 4 * se, f"{name}: mean {est.mean():.4f} vs truth {truth:.4f} (se {se:.4f})"
    # Strata by class × cell remove the between-class spread, the bulk of the variance here.
    assert sg.var() < 0.5 * ns.var(), f"Var SG {sg.var():.4f} vs Var NS {ns.var():.4f}"


@pytest.mark.parametrize("shape,grid", [((48, 48), 4), ((16, 16, 16), (2, 3, 2))], ids=["2d", "3d"])
def test_sg_counts_follow_proportional_allocation(shape, grid):
    coords, labels, _ = make_field(shape)
    strata, M = stratum_ids(coords, grid, labels=labels)
    counts = torch.bincount(strata, minlength=M).double()
    n = 100
    expected = n * counts / counts.sum()
    g = torch.Generator().manual_seed(7)
    got = []
    for _ in range(300):
        d = sample("sg", coords, n, grid, g, labels=labels)
        assert d.index.numel() == n
        assert torch.equal(d.stratum, strata[d.index])
        c = torch.bincount(d.stratum, minlength=M).double()
        assert bool(((c == expected.floor()) | (c == expected.ceil())).all()), (c, expected)
        got.append(c)
    mean = torch.stack(got).mean(0)
    assert torch.allclose(mean, expected, atol=0.12), (mean - expected).abs().max()


@pytest.mark.parametrize("shape,grid", [((32, 32), 4), ((12, 12, 12), 3)], ids=["2d", "3d"])
def test_sag_reflections_stay_in_their_stratum(shape, grid):
    coords, labels, _ = make_field(shape)
    g = torch.Generator().manual_seed(3)
    # Candidates: the outer class only (cells cut by its border hold mirror points that are not candidates).
    cand = (labels == 0).nonzero().squeeze(1)
    c = coords[cand]
    cells = grid_cells(c, grid)
    is_candidate = {tuple((p * torch.tensor(shape)).floor().long().tolist()) for p in c}
    exact = snapped = 0
    for _ in range(50):
        n = 41
        d = sample("sag", c, n, grid, g)
        assert d.index.numel() == n
        base, refl = d.index[:21], d.index[21:]
        assert torch.equal(cells[refl], cells[base[:20]]), "a reflection left its grid cell"
        cell_of = cells[base[:20]]
        lo = torch.stack([((cell_of // int(grid) ** (len(shape) - 1 - a)) % int(grid)).double() / int(grid)
                          for a in range(len(shape))], 1)
        mirror = 2 * (lo + 0.5 / int(grid)) - c[base[:20]]
        for m, r in zip(mirror, refl):
            key = tuple((m * torch.tensor(shape)).floor().long().tolist())
            if key in is_candidate:  # the mirror voxel is a candidate: it must be the one taken
                assert torch.allclose(c[r], m, atol=1e-9)
                exact += 1
    assert exact > 100, exact


@pytest.mark.parametrize("shape,grid", [((32, 32), 4), ((16, 16, 16), 2)], ids=["2d", "3d"])
def test_sag_is_exact_mirror_and_cancels_linear_trends(shape, grid):
    coords = unit_coords(torch.arange(math.prod(shape)), shape)
    values = coords.sum(1) * 5.0                                       # linear: pairs average to the cell centre
    truth = values.mean()
    g = torch.Generator().manual_seed(5)
    d = sample("sag", coords, 64, grid, g)
    cells = grid_cells(coords, grid)
    assert torch.equal(cells[d.index[32:]], cells[d.index[:32]])
    centre_sum = coords[d.index[:32]] + coords[d.index[32:]]
    lo = torch.stack([((cells[d.index[:32]] // grid ** (len(shape) - 1 - a)) % grid).double() for a in range(len(shape))], 1)
    assert torch.allclose(centre_sum, (2 * lo + 1) / grid, atol=1e-12)
    sag = estimates("sag", coords, values, 64, grid, seed=1)
    sg = estimates("sg", coords, values, 64, grid, seed=1)
    se = sag.std() / math.sqrt(DRAWS)
    assert abs(sag.mean() - truth) < 4 * se + 1e-9
    assert sag.var() < 0.25 * sg.var(), f"Var SAG {sag.var():.5f} vs Var SG {sg.var():.5f}"


def test_index_grid_blocks_and_reflections():
    N, n, cut = 1024, 256, 4                    # a 32×32 pseudo-grid, 8×8 blocks, 16 draws per block
    g = torch.Generator().manual_seed(0)
    d = sample_index_grid(N, n, g, cut=cut)
    row, col = d.index // 32, d.index % 32
    block = (row // 8) * cut + col // 8
    assert torch.equal(block, d.stratum)
    assert torch.equal(torch.bincount(block, minlength=16), torch.full((16,), 16))
    a = sample_index_grid(N, n, g, cut=cut, antithetic=True)
    row, col = a.index // 32, a.index % 32
    first = (row // 8 * 8) * 32 + col // 8 * 8
    last = first + 7 * 32 + 7
    mirrored = first + last - a.index
    assert sorted(mirrored.tolist()) == sorted(a.index.tolist())    # the draw is closed under reflection
    small = sample_index_grid(5, 20, g)                              # too few for a grid: uniform fallback
    assert small.index.numel() == 20 and int(small.index.max()) < 5


def test_more_draws_than_candidates_spreads_evenly():
    coords = unit_coords(torch.arange(30), (5, 6))
    g = torch.Generator().manual_seed(0)
    for kind in ("ns", "sg"):
        d = sample(kind, coords, 100, 2, g)
        mult = torch.bincount(d.index, minlength=30)
        assert d.index.numel() == 100 and int(mult.min()) >= 3 and int(mult.max()) <= 4, (kind, mult)


def test_allocation_is_exactly_proportional_in_expectation():
    counts = torch.tensor([5, 0, 3, 10, 1])
    g = torch.Generator().manual_seed(0)
    allocs = torch.stack([allocate(counts, 7, g) for _ in range(4000)]).double()
    assert bool((allocs.sum(1) == 7).all()) and bool((allocs[:, 1] == 0).all())
    assert torch.allclose(allocs.mean(0), 7 * counts.double() / 19, atol=0.03)
    assert allocate(counts, 7, rounding="largest").tolist() == [2, 0, 1, 4, 0]


def test_errors_name_the_bad_value():
    coords = unit_coords(torch.arange(16), (4, 4))
    with pytest.raises(ValueError, match="'stratified'"):
        sample("stratified", coords, 4)
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        sample("sg", coords, 4, grid=(2, 2, 2))
    with pytest.raises(ValueError, match="16"):
        unit_coords(torch.tensor([16]), (4, 4))
    assert set(SAMPLERS) == {"ns", "sg", "sag", "index_sg", "index_sag"}
