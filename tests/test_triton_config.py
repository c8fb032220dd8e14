"""Configuration lists of the Triton kernels and the autotuning switch (no compile, no GPU: milliseconds)."""
from __future__ import annotations

import random

import pytest
import torch

from macl_kernels.triton.config import (
    PHASES, SHIPPED_D, SHIPPED_DTYPES, SIZE_EXAMPLES, choose_config, config_list, precisions, shipped_configs)


def _classes():
    for phase in PHASES:
        for dtype in SHIPPED_DTYPES:
            for prec in precisions(dtype):
                for D in SHIPPED_D:
                    for N, M in list(SIZE_EXAMPLES.values()) + [(7, 5000), (1000, 1537)]:
                        yield phase, dtype, prec, D, N, M


def test_candidates_share_block_d_and_block_dout():
    """Autotuning may change the row / key blocks, warps and stages, never z's D chunking (the backward
    must round z as the forward did) nor the output width (the launcher sizes DS by it)."""
    for phase, dtype, prec, D, N, M in _classes():
        cands = config_list(phase, N, M, D, dtype, prec)
        assert 1 <= len(cands) <= 3 and len(set(cands)) == len(cands)
        assert len({(c.BLOCK_D, c.BLOCK_DOUT) for c in cands}) == 1, (phase, dtype, prec, D, N, M)


def test_backward_recomputes_z_with_the_forward_chunking():
    for _, dtype, prec, D, N, M in _classes():
        bd = {choose_config(ph, N, M, D, dtype, prec).BLOCK_D for ph in PHASES}
        assert len(bd) == 1, (dtype, prec, D, N, M, bd)


def test_tensor_core_backward_owns_the_full_width():
    """16-bit and TF32 backward configurations accumulate all D output columns: z is computed once per
    (row tile, key tile) per kernel (n_dout = 1) for every shipped D, 1024 included."""
    for phase, dtype, prec, D, N, M in _classes():
        if phase != "fwd" and (dtype != torch.float32 or prec == "tf32"):
            for c in config_list(phase, N, M, D, dtype, prec):
                assert c.n_dout(D) == 1 and c.BLOCK_DOUT >= D, (phase, dtype, prec, D, c)


def test_forward_keeps_q_resident_up_to_512_in_16_bit():
    for D in (16, 64, 120, 128, 256, 512):
        for dtype in (torch.float16, torch.bfloat16):
            for c in config_list("fwd", 4096, 4096, D, dtype):
                assert c.BLOCK_D >= D and c.num_stages >= 3, (D, dtype, c)


def test_chooser_returns_only_shipped_configs():
    shipped = {(e.phase, e.dtype, e.precision, e.D, e.config) for e in shipped_configs()}
    by_class = {(e.phase, e.dtype, e.precision, e.config) for e in shipped_configs()}
    rnd = random.Random(0)
    for _ in range(300):
        phase, dtype = rnd.choice(PHASES), rnd.choice(SHIPPED_DTYPES)
        prec, D = rnd.choice(precisions(dtype)), rnd.choice(SHIPPED_D)
        N, M = rnd.choice([1, 7, 16, 17, 32, 33, 100, 5000]), rnd.choice([1, 9, 16, 31, 32, 64, 4097])
        for c in config_list(phase, N, M, D, dtype, prec):
            assert (phase, dtype, prec, D, c) in shipped, (phase, dtype, prec, D, N, M)
    # a D between the shipped ones gets its class's configurations
    for phase in PHASES:
        assert (phase, torch.bfloat16, "ieee", choose_config(phase, 4096, 4096, 200, torch.bfloat16)) in by_class


def test_small_groups_get_small_blocks():
    for phase in PHASES:
        assert choose_config(phase, 32, 32, 128, torch.float16).BLOCK_M == 32
        assert choose_config(phase, 8, 8, 64, torch.float32).BLOCK_N == 16
        big = choose_config(phase, 4096, 4096, 128, torch.float16)
        assert min(big.BLOCK_M, big.BLOCK_N) >= 64 and big.num_warps >= 4


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="phase"):
        config_list("dv", 16, 16, 16, torch.float16)


def test_autotuning_only_on_a_gpu(monkeypatch):
    from macl_kernels.triton.autotune import autotune_enabled
    monkeypatch.delenv("MACL_TRITON_AUTOTUNE", raising=False)
    assert autotune_enabled(interpret=False) and not autotune_enabled(interpret=True)
    monkeypatch.setenv("MACL_TRITON_AUTOTUNE", "0")
    assert not autotune_enabled(interpret=False)


def test_tuner_wraps_exactly_the_candidates():
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    from macl_kernels.triton.autotune import TUNE_KEY, tuner
    from macl_kernels.triton.kernels_fwd import contrast_fwd_kernel
    cands = config_list("fwd", 4096, 4096, 128, torch.bfloat16)
    t = tuner(contrast_fwd_kernel, cands)
    assert isinstance(t, Autotuner) and t is tuner(contrast_fwd_kernel, list(cands))
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in t.configs] == \
        [(c.constexprs(), c.num_warps, c.num_stages) for c in cands]
    assert t.keys == TUNE_KEY and all(k in t.arg_names for k in TUNE_KEY)


def test_interpreter_launch_uses_the_default(monkeypatch):
    """Under TRITON_INTERPRET the launcher never autotunes: it launches cands[0] with its constexprs."""
    from macl_kernels.triton import autotune
    seen = {}

    class Fake:
        def __getitem__(self, grid):
            seen["grid"] = grid
            return lambda *a, **kw: seen.update(kw=kw)

    monkeypatch.setattr("macl_kernels.triton.kernels_fwd.kernel", lambda fn, interpret=None: Fake())
    monkeypatch.setattr(autotune, "tuner", lambda *a: pytest.fail("autotuned under the interpreter"))
    cands = config_list("fwd", 4096, 4096, 128, torch.bfloat16)
    autotune.launch(object(), cands, True, lambda meta: (10 // meta["BLOCK_M"],), [], {"D": 128})
    assert seen["grid"] == (10 // cands[0].BLOCK_M,)
    assert seen["kw"]["BLOCK_M"] == cands[0].BLOCK_M and seen["kw"]["num_stages"] == cands[0].num_stages
