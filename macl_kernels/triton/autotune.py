"""Which compiled kernel a launch uses: the fixed default, or Triton's autotuner over `config_list` on a GPU.

Autotuning runs only on a real GPU (never under the interpreter, never for the ahead-of-time compile) and
can be switched off with MACL_TRITON_AUTOTUNE=0 (read at each call), e.g. before capturing a CUDA graph
without a warm-up call: the first launch of each (problem class, N, M, D, flags) times every candidate,
which synchronises. Later launches of that key reuse the winner with no synchronisation.
"""
from __future__ import annotations

import os
from typing import Callable

from .config import KernelConfig

#: constexpr / runtime arguments the tuned choice depends on (besides the per-class tuner itself)
TUNE_KEY = ["N", "M", "D", "RULE", "EXCLUDE_SELF", "HAS_KV"]
_TUNERS: dict = {}


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


def launch(fn, cands: list[KernelConfig], interpret: bool, grid: Callable[[dict], tuple], args: list,
           kwargs: dict) -> None:
    """Launch kernel `fn`: tuned over `cands` on a GPU (when enabled and there is a choice), else `cands[0]`.

    grid(meta) -> grid tuple, with meta holding the BLOCK_* of the configuration that runs.
    """
    from .kernels_fwd import kernel
    if len(cands) > 1 and autotune_enabled(interpret):
        tuner(fn, cands)[grid](*args, **kwargs)
        return
    c = cands[0]
    kernel(fn, interpret)[grid(c.constexprs())](*args, **kwargs, **c.constexprs(), **c.launch_options())
