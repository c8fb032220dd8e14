"""Which compiled kernel a launch uses: the fixed default, or Triton's autotuner over `config_list` on a GPU.

Autotuning runs only on a real GPU (never under the interpreter, never for the ahead-of-time compile) and
can be switched off with MACL_TRITON_AUTOTUNE=0 (read at each call), e.g. before capturing a CUDA graph
without a warm-up call. The choice is keyed on BUCKETS of the sizes: N and M rounded up to powers of two
(`bucket`), with D, the rule, exclude_self, k_valid and the dtype. The first launch of a bucket times every
candidate (Triton's autotuner, at that launch's exact sizes; this synchronises) and the winner is kept for the
whole bucket, so a run whose batch size changes (the last batch of an epoch, several ranks with different
row counts) re-tunes at most once per power of two instead of at every new N. Later launches of a bucket
launch the kept configuration directly: no timing, no synchronisation.
"""
from __future__ import annotations

import os
from typing import Callable

from .config import KernelConfig

#: constexpr / runtime arguments Triton's autotuner keys its timing on (the first launch of a bucket)
TUNE_KEY = ["N", "M", "D", "RULE", "EXCLUDE_SELF", "HAS_KV"]
#: constexpr arguments of the bucket key besides the bucketed sizes (see `bucket_key`)
BUCKET_FLAGS = ("D", "RULE", "EXCLUDE_SELF", "HAS_KV")
_TUNERS: dict = {}
_CHOSEN: dict = {}   # bucket key -> the KernelConfig the first launch of that bucket chose


def bucket(n: int) -> int:
    """The power of two ≥ n (1 for n ≤ 1): the autotuning bucket of a row or key count."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket_key(fn, cands: list, sizes: tuple, kwargs: dict, dtype) -> tuple:
    """(kernel, candidates, bucket(N), bucket(M), D, rule, exclude_self, k_valid, dtype): launches with equal
    keys share one tuned configuration."""
    return (fn, tuple(cands), *(bucket(n) for n in sizes), *(kwargs.get(k) for k in BUCKET_FLAGS), dtype)


def autotune_enabled(interpret: bool) -> bool:
    """True on a real GPU unless MACL_TRITON_AUTOTUNE=0 (read now)."""
    return not interpret and os.environ.get("MACL_TRITON_AUTOTUNE", "1") != "0"


def triton_configs(cands: list[KernelConfig]) -> list:
    """`triton.Config` objects of the candidates (BLOCK_* constexprs, num_warps, num_stages, maxnreg)."""
    import triton
    return [triton.Config(c.constexprs(), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg)
            for c in cands]


def tuner(fn, cands: list[KernelConfig]):
    """The cached `triton.autotune` wrapper of kernel `fn` over `cands` (one per distinct candidate list)."""
    import triton
    key = (fn, tuple(cands))
    if key not in _TUNERS:
        _TUNERS[key] = triton.autotune(configs=triton_configs(cands), key=TUNE_KEY)(triton.JITFunction(fn))
    return _TUNERS[key]


def _chosen(t, cands: list[KernelConfig]) -> KernelConfig:
    """The candidate the autotuner `t` just ran (its `best_config`), matched on constexprs and launch options."""
    best = t.best_config
    for c in cands:
        if (c.constexprs() == dict(best.kwargs) and c.num_warps == best.num_warps
                and c.num_stages == best.num_stages):
            return c
    raise RuntimeError(f"the autotuner chose {best}, which is none of the candidates {cands}")


def launch(fn, cands: list[KernelConfig], interpret: bool, grid: Callable[[dict], tuple], args: list,
           kwargs: dict, sizes: tuple = ()) -> None:
    """Launch kernel `fn`: tuned over `cands` on a GPU (when enabled and there is a choice), else `cands[0]`.

    grid(meta) -> grid tuple, with meta holding the BLOCK_* of the configuration that runs. sizes: (N, M) of
    the launch, bucketed for the tuning key (module docstring); args[0] is the q operand (its dtype is keyed).
    """
    from .kernels_fwd import kernel
    c = cands[0]
    if len(cands) > 1 and autotune_enabled(interpret):
        key = bucket_key(fn, cands, sizes, kwargs, getattr(args[0], "dtype", None) if args else None)
        c = _CHOSEN.get(key)
        if c is None:   # the bucket's first launch: time the candidates, keep the winner for the bucket
            t = tuner(fn, cands)
            t[grid](*args, **kwargs)
            _CHOSEN[key] = _chosen(t, cands)
            return
    kernel(fn, interpret)[grid(c.constexprs())](*args, **kwargs, **c.constexprs(), **c.launch_options())
