"""The run folder's file primitives: atomic writes, appends that never leave half a line, a full disk named.

Every byte written into a run folder goes through :func:`_write_all`: the one place a test patches to inject a
full disk (callers outside this module reach it as ``files._write_all`` so a patch takes effect everywhere).
:mod:`macl.run.lock` and :mod:`macl.run.folder` both build on this module; it imports neither.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)



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


def require_writable(folder: Any) -> None:
    """Fail early, naming ``folder``, when no file can be created in it (read-only, no permission, missing): a
    command that writes its result at the end checks this before it computes anything.

    Raises:
        PermissionError / OSError: ``<folder>: cannot write into this folder (<reason>)``.
    """
    probe = os.path.join(os.fspath(folder), f".macl-write-test{_tmp_path('')}")  # *.tmpPID: clean_temp's name
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        cls = PermissionError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else OSError
        raise cls(f"{os.fspath(folder)}: cannot write into this folder ({e.strerror or e})") from None


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
