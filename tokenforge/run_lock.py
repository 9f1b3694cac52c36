"""An exclusive lock on a run folder, so two trainings never write into the same one.

Two processes training into one folder interleave ``metrics.csv`` and make Lightning version the
checkpoints (``last-v1.ckpt``). The lock is a file ``RUN_FOLDER/.lock`` created with ``O_EXCL``
(atomic on local filesystems and NFSv3+) holding the owner's PID and host. A lock whose owner runs on
this host but no longer exists (a killed run) is stale and taken over with a notice; a lock from
another host cannot be checked and is reported with the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"


class RunFolderLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """The live owner of ``run_dir``'s lock (``{"pid", "host", "since"}``), or None (no lock, or stale)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        info = {}  # half-written by a process killed between create and write: unknown owner
    if not isinstance(info, dict):
        info = {}
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
        return None
    if not info and time.time() - path.stat().st_mtime > 60:
        return None  # an empty lock file older than a minute: its writer died before writing
    return info or {"pid": None, "host": None, "since": None}


class RunLock:
    """``with RunLock(run_dir): ...`` holds the folder exclusively (creating it when needed)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.run_dir)
                if holder is None:  # stale: the owner is gone
                    print(f"note: removing the stale lock {self.path} (its process is no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunFolderLockedError(
                    f"run folder {self.run_dir} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {holder.get('since')}); wait for it, train with --name NEW, "
                    f"or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return self
        raise RunFolderLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
