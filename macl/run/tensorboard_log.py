"""Optional TensorBoard logging (`--tensorboard`): every numeric value of each training progress record as a
scalar, into RUN/tensorboard/, beside the JSON lines the run writes anyway (log.jsonl, finetune_log.jsonl, ...).

Needs the `tensorboard` package (`pip install "macl[tensorboard]"`); without it `with_tensorboard` raises a
one-line MissingExtraError before training starts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from macl.extras import require

Progress = Callable[[int, int, Optional[dict]], None]


class TensorBoardLog:
    """A SummaryWriter on `folder`; `wrap(progress, tag)` returns a progress callback that writes the record's
    numbers as `tag/name` at global step `done`, then calls `progress`."""

    def __init__(self, folder: Path) -> None:
        require("tensorboard", "--tensorboard")   # fail before training, not at the first step
        self.folder, self._writer = Path(folder), None

    @property
    def writer(self):
        """Made at the first record: the run folder is created by the run, after its data were checked."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.folder))
        return self._writer

    def wrap(self, progress: Optional[Progress], tag: str) -> Progress:
        def logged(done: int, total: int, info: Optional[dict] = None) -> None:
            for name, value in (info or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                        and name not in ("step", "epoch"):
                    self.writer.add_scalar(f"{tag}/{name}", value, done)
            if done >= total:
                self.writer.flush()
            if progress is not None:
                progress(done, total, info)
        return logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def with_tensorboard(enabled: bool, run: Path, progress: Optional[Progress], tag: str) -> Optional[Progress]:
    """`progress` itself when not `enabled`, else it wrapped by a TensorBoardLog writing to run/tensorboard/.
    Only the process that writes the run's files should call this with enabled=True (rank 0)."""
    if not enabled:
        return progress
    return TensorBoardLog(Path(run) / "tensorboard").wrap(progress, tag)
