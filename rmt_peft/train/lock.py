"""One run per output folder: the lock file (``runs.lock_path``) names the owner (pid and host).

``RunLock.acquire`` creates the file exclusively (``O_EXCL``: of two starts racing, one wins).
A second run or resume while the owner lives is refused with a UserError naming the owner; a
lock whose pid is dead on this host (a killed run), or now belongs to a process that started
later (a reused pid, told apart by its start time where /proc has it), is stale: it is replaced,
so a resume after a kill -9 is never blocked. A lock from another host cannot be checked: the message says how to
remove it once that run is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from ..errors import UserError
from ..log import logger
from .. import runs


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    def __init__(self, folder: str):
        self.folder = folder
        self.path = runs.lock_path(folder)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": start_time(os.getpid())}
        self.held = False

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):  # a stale lock is replaced, then the exclusive create is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the run lock (another run keeps taking it)")

    def _clear_stale(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
            pid, host, started = int(owner["pid"]), str(owner["host"]), owner.get("start")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable: its writer was killed between create and write, or it is not ours
            owner, pid, host, started = None, None, self.owner["host"], None
        if host != self.owner["host"]:
            raise UserError(f"training.output_dir={self.folder!r} is in use by a run on host {host} (pid {pid}); "
                            f"if that run is gone, delete {self.path}")
        if pid is not None and pid_alive(pid) and not self._reused(pid, started):
            raise UserError(f"training.output_dir={self.folder!r} is in use by a running run (pid {pid} on {host}); "
                            f"wait for it to end or choose another output_dir")
        if owner is None and time.time() - self._mtime() < 10:
            raise UserError(f"training.output_dir={self.folder!r} is being taken by another run (lock {self.path})")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # stale: its owner is dead

    @staticmethod
    def _reused(pid: int, started) -> bool:
        """True when ``pid`` now names a process other than the one that took the lock."""
        return started is not None and start_time(pid) not in (None, started)

    def _mtime(self) -> float:
        try:
            return os.path.getmtime(self.path)
        except FileNotFoundError:
            return 0.0

    def release(self) -> None:
        """Remove the lock. Never raises: a release runs while an error (a full disk, a folder that
        became read-only) ends the run, and must not hide it; a lock left behind is stale once its
        owner has ended, so the next start replaces it."""
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.warning(f"could not remove the run lock {self.path} ({os.strerror(err.errno or 0)}); "
                               f"the next start replaces it")
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
