"""Run folders as small databases: one writer at a time, atomic files, logs that survive a crash.

What every command that writes a run folder relies on:

- :class:`RunLock` (:mod:`macl.run.lock`, re-exported here): ``RUN/.macl.lock`` with the writer's pid, host and
  command; a second command into the same folder fails naming it; a dead holder's lock is taken over.
- :func:`atomic_write` / :func:`save_torch_atomic`: a temporary ``PATH.tmpPID`` beside the target, fsync,
  ``os.replace``; the target is never half-written, the temporary file is removed on failure, and a full disk
  raises :class:`DiskFullError` (``<path>: no space left on device``) naming the target.
- :class:`JsonlAppender` / :func:`append_text`: appends that never leave half a line behind (a failed write is
  truncated back), flushed per line and fsynced by :meth:`JsonlAppender.sync` at checkpoint time.
- :func:`repair_log`: on resume, drops a trailing partial (or unparsable) line with a warning and the entries
  past the checkpoint's step.
- :func:`find_resume_checkpoint`: ``latest.pt``, else ``final.pt``, else the newest loadable ``step_*.pt``,
  saying which.
- :func:`clean_temp`: removes ``*.tmpPID`` files of processes that are gone (a SIGKILL mid-write leaves them).

The file primitives live in :mod:`macl.run.files` (every byte passes its ``_write_all``, the fault-injection seam)
and the lock in :mod:`macl.run.lock`; both are re-exported here.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from macl.run.files import (DiskFullError, JsonlAppender, _remove_quietly, append_text, atomic_write,  # noqa: F401
                            error_message, fsync_file, save_torch_atomic, write_json)
from macl.run.lock import (LOCK_NAME, RunLock, RunLockedError, created_by_this_process, has_content,  # noqa: F401
                           pid_alive, read_lock)

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"\.tmp(\d+)$")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def repair_log(path: Any, last_step: Optional[int]) -> list[dict]:
    """Make a JSON-lines log consistent with a checkpoint before a resume appends to it.

    A trailing line without its newline (a write cut by a crash) and any line that is not JSON are dropped with a
    warning naming the file; with ``last_step`` given, records whose ``step`` is past it are removed (the resumed
    run writes them again, so the log has no gaps or duplicates). The file is rewritten atomically when it
    changes. Returns the records kept.
    """
    p = Path(path)
    if not p.is_file():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept, bad = [], []
    if tail.strip():
        bad.append(f"a partial last line ({len(tail)} bytes)")
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            bad.append(f"line {no} (not JSON)")
            continue
        kept.append((line, rec))
    if bad:
        logger.warning("%s: dropped %s (the previous run was interrupted mid-write)", p, ", ".join(bad))
    records = [(ln, r) for ln, r in kept
               if last_step is None or not isinstance(r, dict) or int(r.get("step", 0) or 0) <= last_step]
    new = b"".join(ln + b"\n" for ln, _ in records)
    if new != raw:
        atomic_write(p, new)
    return [r for _, r in records]


def repair_tail(path: Any) -> None:
    """Cut a trailing partial line off an append-only JSON-lines file (events.jsonl) in place."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError:
        return
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        logger.warning("%s: dropped a partial last line (%d bytes) left by an interrupted write", p, len(raw) - cut)
        with open(p, "r+b") as fh:
            fh.truncate(cut)


# ------------------------------------------------------------------------------------------------ checkpoints
def describe_load_error(exc: BaseException) -> str:
    """A short, safe reason a checkpoint did not load (never suggests ``weights_only=False``)."""
    text = str(exc)
    if "weights_only" in text or "Unpickl" in type(exc).__name__:
        return "it holds objects the safe loader (weights_only=True) refuses; not a macl checkpoint"
    if isinstance(exc, EOFError) or any(s in text for s in ("zip", "central directory", "EOF", "stream")):
        return "truncated or not a checkpoint"
    first = text.splitlines()[0][:100] if text else ""
    return f"truncated or corrupt: {type(exc).__name__}{': ' + first if first else ''}"


def load_checkpoint_safe(path: Any, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; raises ValueError naming ``path`` when it cannot be read."""
    import torch
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot load checkpoint ({describe_load_error(e)})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint (holds {type(obj).__name__})")
    return obj


def step_checkpoints(ckpt_dir: Any) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir``, newest step first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(ckpt_dir: Any, map_location: Any = "cpu") -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume from: ``latest.pt``, else ``final.pt`` (a finished run), else the newest
    loadable ``step_*.pt``.

    Returns (path, loaded checkpoint), or None when the folder holds no checkpoint at all. A fallback is
    announced with a warning naming the damaged file and the one used.

    Raises:
        ValueError: checkpoints exist but none loads (names ``latest.pt`` and why).
    """
    d = Path(ckpt_dir)
    candidates = [d / n for n in ("latest.pt", "final.pt") if (d / n).is_file()] + step_checkpoints(d)
    if not candidates:
        return None
    failures = []
    for p in candidates:
        try:
            ckpt = load_checkpoint_safe(p, map_location)
            if "step" not in ckpt or "model" not in ckpt:
                raise ValueError(f"{p}: not a pre-training checkpoint (no 'step' / 'model')")
        except ValueError as e:
            failures.append(str(e))
            continue
        if failures:
            logger.warning("%s; resuming from %s (step %d) instead", "; ".join(failures), p, int(ckpt["step"]))
        return p, ckpt
    raise ValueError(f"{failures[0]}, and no loadable step_*.pt beside it; remove {d} to start over or "
                     f"choose a new --out")


# ------------------------------------------------------------------------------------------------ temp files
def clean_temp(folder: Any) -> list[Path]:
    """Remove ``*.tmpPID`` files under ``folder`` whose process is gone; returns what was removed."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for dirpath, _, files in os.walk(root):
        for name in files:
            m = _TMP_RE.search(name)
            if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
                p = Path(dirpath) / name
                _remove_quietly(p)
                removed.append(p)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]))
    return removed



__all__ = ["DiskFullError", "RunLockedError", "RunLock", "atomic_write", "write_json", "save_torch_atomic",
           "append_text", "fsync_file", "JsonlAppender", "repair_log", "repair_tail", "load_checkpoint_safe",
           "find_resume_checkpoint", "step_checkpoints", "clean_temp", "error_message", "has_content",
           "created_by_this_process", "read_lock", "LOCK_NAME"]
