"""The one error type that data problems raise.

Every problem with a user's data (unreadable file, empty folder, shape mismatch, unexpected label
values, wrong dimensionality) is reported as :class:`DataError`, whose message starts with the
offending path and then says what is wrong, e.g.::

    DataError: /data/imagesTr/case_003_0000.nii.gz: cannot read NIfTI (EOFError: Compressed file
    ended before the end-of-stream marker was reached)
"""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with one file or folder of the user's data.

    Attributes:
        path: the file or folder at fault.
        problem: what is wrong with it, in one line.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
