"""Run folders as small databases: one writer at a time, atomic files, logs that survive a crash.

What every command that writes a run folder relies on:

- :class:`RunLock` (:mod:`macl.runlock`, re-exported here): ``RUN/.macl.lock`` with the writer's pid, host and
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

Every byte written into a run folder goes through :func:`_write_all`: the one place a test patches to inject a
full disk.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"\.tmp(\d+)$")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class DiskFullError(OSError):
    """The disk (or quota) is full while writing ``filename``; the file's previous version is kept."""

    def __init__(self, path: Any) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: no space left on device"


def _is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def error_message(exc: BaseException) -> Optional[str]:
    """The one-line text for a full disk (``<path>: no space left on device``), or None for other errors."""
    if isinstance(exc, DiskFullError):
        return str(exc)
    if _is_enospc(exc):
        return f"{exc.filename or 'a file'}: no space left on device"
    return None


# ------------------------------------------------------------------------------------------------- writing
def _write_all(fh: Any, data: bytes) -> None:
    """Write ``data`` to the open binary file ``fh``: every run-folder write passes here (fault-injection seam)."""
    fh.write(data)


def _remove_quietly(path: Any) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _tmp_path(path: Any) -> str:
    return f"{os.fspath(path)}.tmp{os.getpid()}"


def atomic_write(path: Any, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via ``path.tmpPID``, fsync and ``os.replace``.

    Raises:
        DiskFullError: the disk is full (``path`` keeps its previous content, the temporary file is removed).
        OSError: another write error (the temporary file is removed).
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            _write_all(fh, raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if _is_enospc(e):
            raise DiskFullError(path) from e
        raise


def write_json(path: Any, obj: Any, **dump_kw: Any) -> None:
    """``json.dumps(obj, **dump_kw)`` written with :func:`atomic_write`."""
    atomic_write(path, json.dumps(obj, **dump_kw))


class _Sink:
    """A file-like ``write`` for ``torch.save`` that routes through `_write_all` and remembers the first
    OSError (torch turns it into an opaque ``RuntimeError: ... unexpected pos``)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            _write_all(self.fh, bytes(data))
        except OSError as e:
            self.error = self.error or e
            raise
        return len(data)

    def flush(self) -> None:
        self.fh.flush()


def save_torch_atomic(obj: Any, path: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`; same errors)."""
    import torch
    tmp = _tmp_path(path)
    sink = None
    try:
        with open(tmp, "wb") as fh:
            sink = _Sink(fh)
            torch.save(obj, sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if _is_enospc(e) or (sink is not None and sink.error is not None and _is_enospc(sink.error)):
            raise DiskFullError(path) from e
        if sink is not None and sink.error is not None:
            raise OSError(sink.error.errno, f"{path}: cannot write ({sink.error.strerror})") from e
        raise


def append_text(path: Any, text: str, fsync: bool = False) -> None:
    """Append ``text`` to ``path``; on failure the file is cut back to its old length (no half line)."""
    with open(path, "ab") as fh:
        _append(fh, path, text.encode())
        if fsync:
            os.fsync(fh.fileno())


def _append(fh: Any, path: Any, data: bytes) -> None:
    start = fh.tell()
    try:
        _write_all(fh, data)
        fh.flush()
    except OSError as e:
        try:
            fh.truncate(start)
        except OSError:
            pass
        if _is_enospc(e):
            raise DiskFullError(path) from e
        raise


def fsync_file(path: Any) -> None:
    """Flush a file's data to disk (a log, at checkpoint time); a missing file is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlAppender:
    """An open JSON-lines log: ``write(line)`` appends and flushes one whole line; ``sync()`` fsyncs.

    Usable as a context manager; ``write`` accepts a text line (ending in ``\\n``) like a text file.
    """

    def __init__(self, path: Any) -> None:
        self.path = path
        self.fh = open(path, "ab")

    def write(self, line: str) -> None:
        _append(self.fh, self.path, line.encode())

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


from macl.runlock import (LOCK_NAME, RunLock, RunLockedError, created_by_this_process, has_content,  # noqa: E402
                          pid_alive, read_lock)

__all__ = ["DiskFullError", "RunLockedError", "RunLock", "atomic_write", "write_json", "save_torch_atomic",
           "append_text", "fsync_file", "JsonlAppender", "repair_log", "repair_tail", "load_checkpoint_safe",
           "find_resume_checkpoint", "step_checkpoints", "clean_temp", "error_message", "has_content",
           "created_by_this_process", "read_lock", "LOCK_NAME"]
