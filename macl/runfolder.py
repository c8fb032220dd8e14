"""Run folders as small databases: one writer at a time, atomic files, logs that survive a crash.

What every command that writes a run folder relies on:

- :class:`RunLock`: ``RUN/.macl.lock`` holds the writer's pid, host and command while it runs (an exclusive
  ``flock`` on it marks the holder alive). A second command into the same folder fails with
  :class:`RunLockedError` naming the lock and its holder; a lock left by a dead process (same host) is taken over
  with a warning.
- :func:`atomic_write` / :func:`save_torch_atomic`: a temporary ``PATH.tmpPID`` beside the target, fsync,
  ``os.replace``; the target is never half-written, the temporary file is removed on failure, and a full disk
  raises :class:`DiskFullError` (``<path>: no space left on device``) naming the target.
- :class:`JsonlAppender` / :func:`append_text`: appends that never leave half a line behind (a failed write is
  truncated back), flushed per line and fsynced by :meth:`JsonlAppender.sync` at checkpoint time.
- :func:`repair_log`: on resume, drops a trailing partial (or unparsable) line with a warning and the entries
  past the checkpoint's step.
- :func:`find_resume_checkpoint`: ``latest.pt``, else the newest loadable ``step_*.pt``, saying which.
- :func:`clean_temp`: removes ``*.tmpPID`` files of processes that are gone (a SIGKILL mid-write leaves them).

Every byte written into a run folder goes through :func:`_write_all`: the one place a test patches to inject a
full disk.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".macl.lock"
_TMP_RE = re.compile(r"\.tmp(\d+)$")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_CREATED: set = set()  # run folders a lock of this process created (removed again when left empty)


class DiskFullError(OSError):
    """The disk (or quota) is full while writing ``filename``; the file's previous version is kept."""

    def __init__(self, path: Any) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: no space left on device"


class RunLockedError(OSError):
    """Another live process holds the run folder's lock (message names the lock file and the holder)."""


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
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:120]}" if first else type(exc).__name__


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
    """The checkpoint to resume from: ``latest.pt``, else the newest loadable ``step_*.pt``.

    Returns (path, loaded checkpoint), or None when the folder holds no checkpoint at all. A fallback is
    announced with a warning naming the damaged file and the one used.

    Raises:
        ValueError: checkpoints exist but none loads (names ``latest.pt`` and why).
    """
    d = Path(ckpt_dir)
    candidates = ([d / "latest.pt"] if (d / "latest.pt").is_file() else []) + step_checkpoints(d)
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
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp(folder: Any) -> list[Path]:
    """Remove ``*.tmpPID`` files under ``folder`` whose process is gone; returns what was removed."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for dirpath, _, files in os.walk(root):
        for name in files:
            m = _TMP_RE.search(name)
            if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
                p = Path(dirpath) / name
                _remove_quietly(p)
                removed.append(p)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]))
    return removed


# ------------------------------------------------------------------------------------------------ the lock
def has_content(folder: Any) -> bool:
    """Whether ``folder`` exists and holds anything besides the lock file."""
    try:
        return any(p.name != LOCK_NAME for p in Path(folder).iterdir())
    except OSError:
        return False


def created_by_this_process(folder: Any) -> bool:
    """Whether a :class:`RunLock` of this process created ``folder`` (it did not exist before the command)."""
    return str(Path(folder).resolve()) in _CREATED


def _holder_text(info: dict) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    cmd = f" (macl {info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{cmd}{when}"


class RunLock:
    """An exclusive lock on a run folder: ``RUN/.macl.lock`` with the holder's pid, host and command.

    Args:
        folder: the run folder. create: create it (and parents) when missing; a folder created here and still
            holding nothing but the lock at :meth:`release` is removed again. With ``create=False`` and no folder,
            nothing is locked.
        command: recorded in the lock for the message another process shows.

    Raises (from :meth:`acquire`):
        RunLockedError: a live process holds the lock (or one on another host: it cannot be checked).
        DiskFullError: the lock cannot be written.
    """

    def __init__(self, folder: Any, command: str = "", create: bool = True) -> None:
        self.folder, self.command, self.create = Path(folder), command, create
        self.path = self.folder / LOCK_NAME
        self.fh = None
        self.created = False

    def acquire(self) -> "RunLock":
        if not self.folder.is_dir():
            if not self.create:
                return self
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created = True
            _CREATED.add(str(self.folder.resolve()))
        for _ in range(5):
            fh = open(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            locked = self._flock(fh)
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and flock: try the new one
                fh.close()
                continue
            try:
                self._check_holder(fh, locked)
                self._write_info(fh)
            except BaseException:
                fh.close()
                self._drop_created()
                raise
            self.fh = fh
            return self
        raise RunLockedError(f"{self.path}: could not take the run folder's lock (it keeps changing)")

    @staticmethod
    def _flock(fh: Any) -> Optional[bool]:
        """True: locked; False: another process holds it; None: the file system has no flock."""
        try:
            import fcntl
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):
            return False
        except (ImportError, OSError):
            return None

    def _check_holder(self, fh: Any, locked: Optional[bool]) -> None:
        fh.seek(0)
        raw = fh.read()
        try:
            info = json.loads(raw) if raw.strip() else {}
        except ValueError:
            info = {}
        info = info if isinstance(info, dict) else {}
        host = socket.gethostname()
        pid = int(info.get("pid", 0) or 0) if str(info.get("pid", "0")).isdigit() else 0
        if locked is False:
            raise RunLockedError(f"{self.path}: the run folder is in use by {_holder_text(info)}; wait for it to "
                                 f"finish or choose another --out")
        if not info:
            return
        if info.get("host") not in (None, host):
            raise RunLockedError(f"{self.path}: the run folder is locked by {_holder_text(info)} (another machine, "
                                 f"cannot check it); delete the lock file if that run is gone")
        if locked is None and pid != os.getpid() and _pid_alive(pid):  # no flock here: trust the pid
            raise RunLockedError(f"{self.path}: the run folder is in use by {_holder_text(info)}; wait for it to "
                                 f"finish or choose another --out")
        logger.warning("%s: taking over the stale lock of %s (no longer running)", self.path, _holder_text(info))

    def _write_info(self, fh: Any) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        try:
            fh.seek(0)
            fh.truncate()
            _write_all(fh, (json.dumps(info) + "\n").encode())
            fh.flush()
        except OSError as e:
            if _is_enospc(e):
                raise DiskFullError(self.path) from e
            raise

    def _drop_created(self) -> None:
        if self.created and not has_content(self.folder):
            _remove_quietly(self.path)
            try:
                self.folder.rmdir()
            except OSError:
                pass
            _CREATED.discard(str(self.folder.resolve()))

    def release(self) -> None:
        """Remove the lock (and a folder this lock created that holds nothing else)."""
        if self.fh is None:
            return
        _remove_quietly(self.path)
        self.fh.close()
        self.fh = None
        self._drop_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_lock(folder: Any) -> Optional[dict]:
    """The holder recorded in ``folder``'s lock file, or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


__all__ = ["DiskFullError", "RunLockedError", "RunLock", "atomic_write", "write_json", "save_torch_atomic",
           "append_text", "fsync_file", "JsonlAppender", "repair_log", "repair_tail", "load_checkpoint_safe",
           "find_resume_checkpoint", "step_checkpoints", "clean_temp", "error_message", "has_content",
           "created_by_this_process", "read_lock", "LOCK_NAME"]
