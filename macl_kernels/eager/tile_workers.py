"""Tile-parallel execution of the torch path on a multi-core CPU: T worker threads, one core each.

Eager PyTorch parallelises each operation over the intra-op threads: every tile's GEMM is split T ways and
every elementwise pass ends in a barrier. The backward GEMMs of a tile (E·k into dq, Eᵀ·q into dk: long
reductions into thin (rows, D) outputs) scale worst that way. Here each worker instead runs whole tiles
with one intra-op thread (PyTorch releases the GIL inside every operation), so T tiles run at once.

Races are excluded by the schedule, not by locks:
- "rows" (forward): worker i takes the tiles of row blocks b ≡ i (mod T); each row's statistics have one
  writer.
- "latin" (backward): tiles write dq rows of their row block and dk rows of their key block. In phase
  p = 0..T−1 worker i takes the tiles with row block b ≡ i and key block c ≡ i + p (mod T): within a phase
  no two workers share a row block or a key block (a Latin square), and the phases run one after another.
Every tile is visited exactly once either way (tested), and each output element is accumulated in the same
tile order as the serial loop's restricted to its own row or key block, so results agree to rounding.

Used only when it can pay: more than one intra-op thread, `PARALLEL_TILES` on, and at least T row blocks
and T key blocks. During the call the process runs with one intra-op thread (`torch.set_num_threads(1)`,
restored afterwards, also on error): other Python threads' PyTorch work is single-threaded meanwhile.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Optional

import torch

#: master switch (True: use workers where `plan` allows; False: the serial loop with intra-op threads)
PARALLEL_TILES = True

_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _executor(T: int) -> ThreadPoolExecutor:
    """A process-wide pool with at least T threads (grown, never shut down under a running caller; made anew
    in a forked child, where the parent's threads do not exist)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool._max_workers < T or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(max_workers=T, thread_name_prefix="macl-tiles"), os.getpid()
        return _pool


def plan(tile_list: list, kind: str, device: torch.device = torch.device("cpu")) -> Optional[list]:
    """The phases of a parallel run: a list of phases, each a list of T per-worker tile lists; None when
    the serial loop should run (not a CPU device, one intra-op thread, the switch off, or fewer than T row
    blocks, or for "latin" key blocks). tile_list: (g0, g1, r0, r1, c0, c1) tuples of `torch_tiled.tiles`.
    A row block is a (g0, r0) pair, a key block a (g0, c0) pair: tiles of different group chunks never share
    an output row, so blocks are numbered across chunks."""
    if kind not in ("rows", "latin"):
        raise ValueError(f"kind must be 'rows' or 'latin', got {kind!r}")
    T = torch.get_num_threads()
    if not PARALLEL_TILES or T < 2 or not tile_list or torch.device(device).type != "cpu":
        return None
    rb = {b: i for i, b in enumerate(sorted({(t[0], t[2]) for t in tile_list}))}
    cb = {b: i for i, b in enumerate(sorted({(t[0], t[4]) for t in tile_list}))}
    if len(rb) < T or (kind == "latin" and len(cb) < T):
        return None
    row = [rb[(t[0], t[2])] % T for t in tile_list]
    if kind == "rows":
        return [[[t for t, r in zip(tile_list, row) if r == i] for i in range(T)]]
    col = [cb[(t[0], t[4])] % T for t in tile_list]
    return [[[t for t, r, c in zip(tile_list, row, col) if r == i and c == (i + p) % T] for i in range(T)]
            for p in range(T)]


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextmanager
def _one_intra_op_thread():
    """One intra-op thread while any caller's workers run; the caller's count back when the last one ends
    (calls from several Python threads at once share the saved count instead of restoring each other's 1)."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
        T = _threads_saved
    try:
        yield T
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def run(tile_list: list, kind: str, make_state: Callable[[], object], body: Callable[[object, tuple], None],
        device: torch.device = torch.device("cpu")) -> None:
    """Call body(state, tile) for every tile: in parallel per `plan` (one `make_state()` per worker, e.g. its
    own tile buffer), else serially in order with one state."""
    phases = plan(tile_list, kind, device)
    if phases is None:
        _serial([tile_list], make_state, body)
    else:
        _parallel(phases, make_state, body)


def _serial(lists: list, make_state, body) -> None:
    state = make_state()
    for tiles in lists:
        for t in tiles:
            body(state, t)


def _parallel(phases: list, make_state, body) -> None:
    """Run the phases one after another; phase[i] is worker i's tile list (T = len(phase))."""
    def work(args):
        state, mine = args
        torch.set_num_threads(1)  # per pool thread: under MKL_CBWR=AVX2 a pool thread otherwise rounds like 2 threads
        for t in mine:
            body(state, t)

    T = len(phases[0])
    with _one_intra_op_thread():
        pool = _executor(T)
        states = [make_state() for _ in range(T)]
        for phase in phases:
            for f in [pool.submit(work, (states[i], phase[i])) for i in range(T) if phase[i]]:
                f.result()   # re-raises a worker's exception here


def tournament(n: int) -> list:
    """Rounds of block pairs (a, b), a ≤ b, covering every pair of n blocks once, diagonals (a, a) included,
    with the blocks of one round pairwise disjoint (a round-robin tournament by the circle method; a block's
    bye round holds its diagonal; for even n the diagonals form one more round)."""
    players = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = players[i], players[m - 1 - i]
            if a is None or b is None:
                a = b = a if b is None else b
            pairs.append((min(a, b), max(a, b)))
        rounds.append(pairs)
        players = [players[0], players[-1]] + players[1:-1]
    if n and n % 2 == 0:
        rounds.append([(a, a) for a in range(n)])
    return rounds


def run_rounds(rounds: list, make_state: Callable[[], object], body: Callable[[object, tuple], None],
               device: torch.device = torch.device("cpu")) -> None:
    """Call body(state, tile) for every tile of `rounds` (lists of tiles that share no output block): the
    rounds one after another, each dealt over the workers when `PARALLEL_TILES` allows; else serially."""
    T = torch.get_num_threads()
    if (not PARALLEL_TILES or T < 2 or torch.device(device).type != "cpu"
            or sum(len(r) for r in rounds) < 2 * T):
        _serial(rounds, make_state, body)
    else:
        _parallel([[r[i::T] for i in range(T)] for r in rounds], make_state, body)
