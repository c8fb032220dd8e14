"""Output of the ``macl`` command line: tqdm progress bars, the JSON-lines event log, console warnings.

Only the command line uses these; library code reports progress through plain callables and diagnostics
through :mod:`logging`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


class EventLog(logging.Handler):
    """JSON lines in ``folder/events.jsonl``: explicit events plus the ``macl`` logger's records.

    Lines are kept in memory until the folder holds something besides its lock (a command must not leave a run
    folder behind before its data have been checked), then appended and flushed one by one; a failed append is
    cut back, so the file never keeps half a line.
    """

    def __init__(self, folder: Optional[Path], command: str) -> None:
        super().__init__(logging.INFO)
        self.folder, self.command, self.pending = folder, command, []

    def event(self, kind: str, **fields: Any) -> None:
        self._write({"time": round(time.time(), 3), "command": self.command, "event": kind, **fields})

    def emit(self, record: logging.LogRecord) -> None:
        try:  # a full disk must not turn a warning into a traceback; the line stays pending
            self._write({"time": round(record.created, 3), "command": self.command, "event": "log",
                         "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()})
        except OSError:
            pass

    def _write(self, obj: dict) -> None:
        self.pending.append(json.dumps(obj, default=str))
        self.sync()

    def sync(self) -> None:
        """Append the pending lines if the folder exists by now."""
        from macl.run.folder import append_text, has_content
        if self.pending and self.folder is not None and has_content(self.folder):
            text, self.pending = "".join(line + "\n" for line in self.pending), []
            try:
                append_text(self.folder / "events.jsonl", text)
            except OSError:
                self.pending = text.splitlines() + self.pending
                raise


class Bars:
    """Progress callbacks drawing tqdm bars: ``bars("stage")`` returns ``progress(done, total, info)``.

    A new stage closes the previous bar; the bar opens at the first call, at ``done - 1``, so a resumed run's
    ETA counts only the remaining steps.
    """

    def __init__(self, enabled: bool = True, on_update: Optional[Callable[[], None]] = None) -> None:
        self.enabled, self.bar, self.stage, self.on_update = enabled, None, None, on_update

    def __call__(self, stage: str):
        def progress(done: int, total: int, info: Optional[dict] = None) -> None:
            if self.on_update is not None:
                self.on_update()
            if not self.enabled:
                return
            from tqdm import tqdm
            if self.bar is None or self.stage != stage:
                self.close()
                self.bar = tqdm(total=total, initial=max(0, done - 1), desc=stage, dynamic_ncols=True,
                                file=sys.stderr, unit="step" if stage.startswith(("pretrain", "finetune")) else "it",
                                leave=True, mininterval=0.5)
                self.stage = stage
            self.bar.update(done - self.bar.n)
            info = info or {}
            post = {k: f"{info[k]:.4g}" for k in ("loss", "lr") if isinstance(info.get(k), float)}
            if "case" in info:
                post["case"] = info["case"]
            if post:
                self.bar.set_postfix(post, refresh=False)
            if done >= total:
                self.close()
        return progress

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.stage = None, None


class TqdmHandler(logging.Handler):
    """Warnings to stderr without breaking a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(f"macl: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)
