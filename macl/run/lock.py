"""The run-folder lock: one writer per run folder, a stale lock of a dead process taken over.

``RUN/.macl.lock`` holds the writer's pid, host, command and start time while it runs; an exclusive ``flock`` on
it marks the holder alive (the kernel drops it when the process dies, even by SIGKILL). A second command into the
same folder fails with :class:`RunLockedError` naming the lock and its holder; a lock left by a dead process on this
host is taken over with a warning; a lock from another host is never guessed about. Writes go through
:func:`macl.run.files._write_all` (the fault-injection seam), so a full disk is a ``DiskFullError`` naming the lock.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from macl.run import files


logger = logging.getLogger(__name__)

LOCK_NAME = ".macl.lock"
_CREATED: set = set()  # run folders a lock of this process created (removed again when left empty)


class RunLockedError(OSError):
    """Another live process holds the run folder's lock (message names the lock file and the holder)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    if not info.get("pid"):
        return "another process (just starting)"
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
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.folder.mkdir()  # exclusive: of two racing commands only one "created" the folder
                self.created = True
                _CREATED.add(str(self.folder.resolve()))
            except FileExistsError:
                pass
        for _ in range(5):
            fh = open(self.path, "a+b")  # created when missing, never truncated here
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
            except BaseException:  # someone else's lock: leave it (and their folder) alone
                fh.close()
                raise
            try:
                self._write_info(fh)
            except BaseException:  # the lock is ours but says nothing: take it away again
                files._remove_quietly(self.path)
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
        if locked is None and pid != os.getpid() and pid_alive(pid):  # no flock here: trust the pid
            raise RunLockedError(f"{self.path}: the run folder is in use by {_holder_text(info)}; wait for it to "
                                 f"finish or choose another --out")
        logger.warning("%s: taking over the stale lock of %s (no longer running)", self.path, _holder_text(info))

    def _write_info(self, fh: Any) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        try:
            fh.seek(0)
            fh.truncate()
            files._write_all(fh, (json.dumps(info) + "\n").encode())
            fh.flush()
        except OSError as e:
            if files._is_enospc(e):
                raise files.DiskFullError(self.path) from e
            raise

    def _drop_created(self) -> None:
        if self.created and not has_content(self.folder):
            files._remove_quietly(self.path)
            try:
                self.folder.rmdir()
            except OSError:
                pass
            _CREATED.discard(str(self.folder.resolve()))

    def release(self) -> None:
        """Remove the lock (and a folder this lock created that holds nothing else)."""
        if self.fh is None:
            return
        files._remove_quietly(self.path)
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

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "has_content", "created_by_this_process", "read_lock",
           "pid_alive"]
