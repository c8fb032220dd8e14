"""TOML parsing on every supported Python: `tomllib` (3.11+) or its backport `tomli` (3.9, 3.10)."""
from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised by tests/test_packaging.py with a patched version_info
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None


def loads(text: str) -> dict:
    """Parse TOML text. Raises ValueError on bad TOML (TOMLDecodeError is one), ModuleNotFoundError naming
    `tomli` on Python < 3.11 without it."""
    if _toml is None:
        raise ModuleNotFoundError("reading TOML on Python < 3.11 needs tomli: pip install tomli "
                                  "(or pip install \"macl[medical]\", which brings it)")
    return _toml.loads(text)
