"""Autotuning keyed on power-of-two buckets of N and M (issue 21 item 4): a new batch size re-tunes at most once
per bucket. Before, the key was (N, M, ...) exactly, so every new N timed every candidate again (a sync)."""
from __future__ import annotations

import pytest
import torch

from macl_kernels.triton import autotune
from macl_kernels.triton.config import config_list


def test_bucket_is_the_next_power_of_two():
    assert [autotune.bucket(n) for n in (0, 1, 2, 3, 4, 5, 100, 128, 129, 4096, 4097)] == \
        [1, 1, 2, 4, 4, 8, 128, 128, 256, 4096, 8192]


@pytest.fixture
def fake_gpu(monkeypatch):
    """launch() as on a GPU with autotuning on, with Triton's autotuner and the kernel launch replaced by
    recorders: `calls` lists ("tune", N) for timed launches and ("fixed", BLOCK_M) for direct ones."""
    pytest.importorskip("triton")
    import triton
    calls = []
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    monkeypatch.setattr(autotune, "autotune_enabled", lambda interpret: True)

    class FakeTuner:
        def __init__(self, cands):
            self.configs = autotune.triton_configs(cands)
            self.best_config = None

        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(("tune", args[1]))
                self.best_config = self.configs[-1]   # "the last candidate was fastest"
            return run

    tuners = {}
    monkeypatch.setattr(autotune, "tuner", lambda fn, cands: tuners.setdefault(tuple(cands), FakeTuner(cands)))

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("fixed", kw["BLOCK_M"]))
    monkeypatch.setattr("macl_kernels.triton.kernels_fwd.kernel", lambda fn, interpret=None: FakeKernel())
    assert triton   # (imported for the Config objects)
    return calls


def _launch(N, M=4096, D=128, dtype=torch.bfloat16, rule=0):
    cands = config_list("fwd", N, M, D, dtype)
    q = torch.empty(0, dtype=dtype)
    autotune.launch("fwd-kernel", cands, False, lambda meta: (1,), [q, N],
                    dict(D=D, RULE=rule, EXCLUDE_SELF=False, HAS_KV=False), sizes=(N, M))
    return cands


def test_one_tuning_per_bucket(fake_gpu):
    cands = _launch(3000)
    assert len(cands) > 1, "the test needs a class with a choice"
    _launch(3001)
    _launch(4096)                 # same bucket (4096): the kept winner, launched directly
    _launch(4097)                 # next bucket: timed again
    _launch(3000, rule=1)         # another rule: its own key
    _launch(3000, dtype=torch.float16)
    assert fake_gpu == [("tune", 3000), ("fixed", cands[-1].BLOCK_M), ("fixed", cands[-1].BLOCK_M),
                        ("tune", 4097), ("tune", 3000), ("tune", 3000)]


def test_single_candidate_and_interpreter_never_tune(fake_gpu, monkeypatch):
    monkeypatch.setattr(autotune, "autotune_enabled", lambda interpret: not interpret)
    cands = config_list("fwd", 3000, 4096, 128, torch.bfloat16)
    autotune.launch("k", cands, True, lambda meta: (1,), [torch.empty(0), 3000], dict(D=128), sizes=(3000, 4096))
    autotune.launch("k", cands[:1], False, lambda meta: (1,), [torch.empty(0), 3000], dict(D=128),
                    sizes=(3000, 4096))
    assert fake_gpu == [("fixed", cands[0].BLOCK_M)] * 2
