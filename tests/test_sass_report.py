"""The compiled-code tool (`macl_kernels.triton.sass_report` / `sass_model`): its SASS reading on hand-written
listings, then the issue-21 acceptance read from real compiles of a few sm_90 configurations (not the loops).

Hand listings: the counts below are worked out by hand from the text (a loop of 2 HGMMA 64x64x16 with A from
shared memory, 3 MUFU.EX2, one LDSM.x4, a nested loop counted × its trips). The compiled checks compile only
the sm_90 bf16 defaults at D = 128 and 256 and the backward kernels at D = 512 (the full table is
`python -m macl_kernels.triton.sass_model`, cached in benchmarks/results/sass_report.json).
"""
from __future__ import annotations

import os

import pytest
import torch

from macl_kernels.triton import sass_report as S
from macl_kernels.triton import sass_model as M

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x0100 ;
        /*0020*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, R8, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0050*/                   MUFU.EX2 R9, R9 ;
        /*0060*/                   MUFU.EX2 R10, R10 ;
        /*0070*/                   FADD R11, R9, R10 ;
        /*0080*/                   MUFU.EX2 R11, R11 ;
        /*0090*/                   DEPBAR.LE SB0, 0x1 ;
        /*00a0*/              @!P1 BRA 0x0020 ;
        /*00b0*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*00c0*/                   LDS.128 R4, [R3] ;
        /*00d0*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*00e0*/              @!P2 BRA 0x00c0 ;
        /*00f0*/              @!P3 BRA 0x00b0 ;
        /*0100*/                   EXIT ;
"""


def test_loops_are_backward_branches():
    instrs = S.parse_sass(LISTING)
    assert len(instrs) == 17
    assert S.loops(instrs) == [(0x20, 0xa0), (0xc0, 0xe0), (0xb0, 0xf0)]


def test_main_loop_counts_by_hand():
    lp = S.main_loop(LISTING)            # the loop with the most MMA instructions: [0x20, 0xa0]
    assert (lp.start, lp.end, lp.hgmma, lp.hmma) == (0x20, 0xa0, 2, 0)
    assert lp.hgmma_macs == 2 * 64 * 64 * 16
    assert (lp.ex2, lp.mufu, lp.ldsm, lp.instructions, lp.depbar) == (3, 3, 1, 9, [1])
    # LDSM.x4: 512 B per warp; HGMMA per warpgroup: B 64·16·2 each, A 64·16·2 for the first (smem), / 4 warps
    assert lp.smem_bytes == 512 + (2 * 2048 + 2048) // 4


def test_nested_loop_counted_times_its_trips():
    instrs = S.parse_sass(LISTING)
    lp = S.count_loop(instrs, 0xb0, 0xf0, inner_trips=4)
    assert lp.nested == 1
    # HMMA at 0xb0 once, HMMA at 0xd0 (inside [0xc0, 0xe0]) 4 times; LDS.128 4 times
    assert lp.hmma == 5 and lp.hmma_macs == 5 * 16 * 8 * 16
    assert lp.lds == 4 and lp.smem_bytes == 4 * 512


def _report(phase, D, loop, warps=8, BM=64, BN=64) -> S.KernelReport:
    return S.KernelReport(phase, "bf16", "ieee", D, 90, "x", BM, BN, D, D, warps, 3, loop=loop,
                          ttgir={"wait_nums": [1], "async_copies": 1, "mma_layouts": []})


def test_duplicated_warpgroup_shows_as_executed_work():
    """A 64-row dq tile at 8 warps: each warpgroup issues the whole z tile (8 × m64n64k16 at D = 128) and
    half the dq GEMM: executed = 2 warpgroups × (z + dq/2) = 3 units where 2 are useful."""
    z = 8 * 64 * 64 * 16                    # one warpgroup's z tile: 64·64·128 MACs
    half_dq = 4 * 64 * 64 * 16              # [4, 2]: each warpgroup owns half of dq's 128 columns
    lp = {"hgmma_macs": z + half_dq, "hmma_macs": 0, "ex2": 32, "mufu": 32}
    r = _report("dq", 128, lp)
    assert r.units == pytest.approx(3.0) and r.ratio == pytest.approx(1.5)
    assert r.exp_passes == pytest.approx(2.0)          # 32 per thread of 256 over 64·64 elements
    # 128 rows: each warpgroup its own 64, z 64×64 (8 × m64n64k16) and dq 64×128 over K = 64 (4 × m64n128k16)
    ok = _report("dq", 128, {**lp, "hgmma_macs": 8 * 64 * 64 * 16 + 4 * 64 * 128 * 16}, BM=128)
    assert ok.units == pytest.approx(2.0) and ok.ratio == pytest.approx(1.0)


# --- compiled code (sm_90, Triton's ptxas and cuobjdump) -------------------------------------------------

def _compiled(D_phases):
    from macl_kernels.triton.aot import FLAG_NAMES, cuobjdump_path
    if not os.path.exists(cuobjdump_path()):
        pytest.skip("Triton's bundled cuobjdump is missing")
    tasks = [t for t in S.report_entries(archs=(90,), dims=tuple({d for d, _ in D_phases}), defaults_only=True)
             if t[0].dtype == torch.bfloat16 and t[0].precision == "ieee" and (t[0].D, t[0].phase) in D_phases]
    tasks = [(e, a, FLAG_NAMES[0]) for e, a, _ in tasks]
    return S.build(tasks)


@pytest.fixture(scope="module")
def sm90():
    pytest.importorskip("triton")
    want = {(D, ph) for D in (128, 256) for ph in ("fwd", "dq", "dk", "dsym")} | {(512, "dq"), (512, "dk"),
                                                                                  (512, "dsym")}
    return _compiled(want)


@pytest.mark.slow
def test_sm90_no_duplicated_mma_and_at_most_five_units(sm90):
    assert all(r.error is None for r in sm90), [r.error for r in sm90]
    for r in sm90:
        assert r.ratio <= 1.05, (r.key, r.units, r.loop["mma"], r.ttgir["mma_layouts"])
    for D in (128, 256):
        rows = {r.phase: r for r in sm90 if r.D == D}
        assert set(rows) == {"fwd", "dq", "dk", "dsym"}
        pair, self_ = [rows[k] for k in ("fwd", "dq", "dk")], [rows["fwd"], rows["dsym"]]
        assert sum(r.units for r in pair) <= 5.0 + 1e-9
        assert sum(r.units for r in self_) <= 3.0 + 1e-9          # self-contrast: fwd + dsym
        # exactly one exp per z element per kernel pass: the forward's α is an exponent-bit power of two
        assert rows["fwd"].exp_passes == pytest.approx(1.0)
        assert sum(r.exp_passes for r in pair) <= 3.0 + 1e-9, [(r.phase, r.exp_passes) for r in pair]
        assert sum(r.exp_passes for r in self_) <= 3.0 + 1e-9, [(r.phase, r.exp_passes) for r in self_]


#: sm_90 16-bit kernels whose z GEMM still runs on mma.sync (32-row z tiles): at 8 warps a 64-row z tile
#: is repeated by the second warpgroup, and 128-row tiles exceed the shared memory (dk at D = 256, 3 stages:
#: benchmarks/sm90_tile_trials) or cannot hold the full-width accumulator (D = 512: 256 registers a thread).
#: dk's gradient GEMM is wgmma; dq's and dsym's at 512 are not.
MMA_SYNC_Z = {("dk", 256), ("dq", 512), ("dk", 512), ("dsym", 512)}


@pytest.mark.slow
def test_sm90_16bit_wgmma_pipelined_no_spills(sm90):
    for r in sm90:
        assert r.spill_bytes == 0, r.key
        assert r.pipelined, (r.key, r.ttgir)          # async copies in the loop, no async_wait {num = 0}
        assert r.loop["hgmma"] > 0 or (r.phase, r.D) in (("dq", 512), ("dsym", 512)), (r.key, r.loop["mma"])
        if (r.phase, r.D) not in MMA_SYNC_Z:
            assert r.loop["hmma"] == 0, (r.key, r.loop["mma"])
    # the exceptions are exactly these: one that now compiles to wgmma must leave the list
    assert {(r.phase, r.D) for r in sm90 if r.loop["hmma"]} == MMA_SYNC_Z & {(r.phase, r.D) for r in sm90}


def test_cache_round_trip(tmp_path, sm90):
    path = tmp_path / "c.json"
    from macl_kernels.triton.aot import FLAG_NAMES
    tasks = [t for t in S.report_entries(archs=(90,), dims=(128,), defaults_only=True)
             if t[0].dtype == torch.bfloat16 and t[0].phase == "fwd"]
    tasks = [(e, a, FLAG_NAMES[0]) for e, a, _ in tasks]
    first = S.load_or_build(tasks, path=str(path), jobs=1)
    again = S.load_or_build(tasks, path=str(path), jobs=1)      # from the file: no compile
    assert path.exists() and [r.key for r in first] == [r.key for r in again]
    assert again[0].loop == first[0].loop and again[0].units == pytest.approx(1.0)
    # rows built from other kernel sources are never answered from the file: they are compiled again
    import json
    blob = json.loads(path.read_text())
    assert blob["kernels"] == S.kernel_source_hash()
    blob["kernels"] = "0" * 16
    blob["rows"][0]["loop"]["hgmma"] = -1        # what a stale row would answer
    path.write_text(json.dumps(blob))
    fresh = S.load_or_build(tasks, path=str(path), jobs=1)
    assert fresh[0].loop == first[0].loop
    assert json.loads(path.read_text())["kernels"] == S.kernel_source_hash()


@pytest.mark.slow
def test_every_shipped_config_from_the_cached_analysis():
    """The acceptance over the whole table (sm_80 and sm_90, fp16 / bf16 / TF32, D ∈ {64, 128, 256, 512}, every
    candidate): read from benchmarks/results/sass_report.json, compiling only what the cache lacks (a changed
    configuration is a new key, so the cache cannot answer for a configuration it did not compile)."""
    from macl_kernels.triton.aot import cuobjdump_path
    if not os.path.exists(cuobjdump_path()):
        pytest.skip("Triton's bundled cuobjdump is missing")
    reps = S.load_or_build(S.report_entries())
    assert {(r.arch, r.dtype if r.precision != "tf32" else "tf32", r.D) for r in reps} == {
        (a, dt, D) for a in (80, 90) for dt in ("fp16", "bf16", "tf32") for D in S.REPORT_D}
    bad = [(r.key, r.units, r.loop["mma"]) for r in reps if r.error or r.ratio > 1.05 or r.spill_bytes]
    assert not bad
    for a in (80, 90):
        for dt in ("fp16", "bf16", "tf32"):
            for D in S.REPORT_D:
                rows = [r for r in reps if r.default and r.arch == a and r.D == D
                        and (r.dtype if r.precision != "tf32" else "tf32") == dt]
                assert sorted(r.phase for r in rows) == ["dk", "dq", "dsym", "fwd"]
                t = M.phase_sums(reps, a, dt, D)
                assert t["units"] <= 5.0 + 1e-9 and t["self_units"] <= 3.0 + 1e-9, (a, dt, D, t)
                assert t["exp"] <= 3.0 + 1e-9 and t["self_exp"] <= 3.0 + 1e-9, (a, dt, D, t)
    drains = [r.key for r in reps if r.arch == 90 and r.dtype in ("fp16", "bf16") and not r.pipelined]
    assert not drains


def test_tile_trials_script(capsys):
    """benchmarks/sm90_tile_trials: what docs/gpu_readiness.md quotes for tiles it did not ship."""
    from benchmarks import sm90_tile_trials as T
    from macl_kernels.triton.aot import cuobjdump_path
    with pytest.raises(Exception, match="PHASE:D"):
        T.parse_tile("dk:256")
    assert T.parse_tile("dk:256:128:64:8:3").config.BLOCK_DOUT == 256
    if not os.path.exists(cuobjdump_path()):
        pytest.skip("Triton's bundled cuobjdump is missing")
    assert T.main(["fwd:128:128:64:8:3"]) == 0
    out = capsys.readouterr().out
    assert "fwd D=128 128x64" in out and "units 1.00" in out and "spill 0 B" in out
