"""Deterministic train/test splits and label budgets.

Both functions sort the case ids first, then permute them with ``numpy.random.default_rng(seed)``,
so the result depends only on the set of ids and the seed (not on listing order). Label budgets
are prefixes of one permutation: with the same seed, the 10 % cases are a subset of the 25 %.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from macl.data.errors import DataError


def _permuted(ids: Sequence[str], seed: int, salt: int) -> list[str]:
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("case ids must be unique")
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, salt]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def split_cases(case_ids: Sequence[str], test_fraction: float = 0.2, seed: int = 0
                ) -> tuple[list[str], list[str]]:
    """Split labelled cases into (train, test), each sorted.

    ``round(test_fraction * n)`` cases (at least 1 when ``test_fraction > 0`` and n >= 2, and
    never all of them) go to test.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1) or no case ids.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(case_ids)
    if n == 0:
        raise ValueError("no case ids to split")
    k = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = min(k, n - 1)
    perm = _permuted(case_ids, seed, 1)
    return sorted(perm[k:]), sorted(perm[:k])


def select_labelled(case_ids: Sequence[str], fraction: float | None = None,
                    cases: Sequence[str] | None = None, seed: int = 0) -> list[str]:
    """The cases whose labels fine-tuning may use, sorted.

    Args:
        case_ids: the training cases available.
        fraction: label budget in (0, 1]: ``max(1, round(fraction * n))`` cases, a prefix of a
            seeded permutation.
        cases: an explicit list instead (every id must be in ``case_ids``).
        seed: permutation seed.

    Raises:
        ValueError: both or neither of ``fraction`` / ``cases``, a fraction outside (0, 1], or
            ids not among ``case_ids`` (named).
    """
    if (fraction is None) == (cases is None):
        raise ValueError("give exactly one of fraction= or cases=")
    if cases is not None:
        unknown = sorted(set(cases) - set(case_ids))
        if unknown:
            raise ValueError(f"labelled cases not among the training cases: {unknown[:10]}")
        return sorted(set(cases))
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise ValueError(f"labels fraction must be in (0, 1], got {fraction}")
    if not case_ids:
        raise ValueError("no case ids to select from")
    k = max(1, int(round(fraction * len(case_ids))))
    return sorted(_permuted(case_ids, seed, 2)[:k])


def read_case_list(path: str | Path) -> list[str]:
    """Case ids from a file: a JSON list (or ``{"labelled": [...]}``), or one id per line.

    Raises:
        DataError: unreadable file or no ids in it.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DataError(p, f"cannot read case list ({e.strerror})") from e
    ids: list[str]
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            obj = obj.get("labelled", obj.get("cases"))
        if not isinstance(obj, list):
            raise DataError(p, "JSON case list must be a list or hold a 'labelled' list")
        ids = [str(x) for x in obj]
    except json.JSONDecodeError:
        ids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataError(p, "the case list is empty")
    return ids
