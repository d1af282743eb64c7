"""One run per output folder (rmt_peft/train/lock.py): the lock names its owner; a live owner on this
host or any owner on another host is refused with a line saying what to do; a dead owner's lock,
or an unreadable one left long ago, is replaced; a release never raises. The lock during real runs
(kills, resumes, a reused pid) is tests/reliability/test_run_folder.py's."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from rmt_peft.errors import UserError
from rmt_peft.train import lock as lock_module
from rmt_peft.train.lock import RunLock, pid_alive, start_time

LOCK = ".rmt-peft.lock"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_owner(folder, **owner):
    (folder / LOCK).write_text(json.dumps(owner))


def test_the_lock_names_its_owner_and_is_gone_after_release(tmp_path):
    folder = tmp_path / "run"  # made by acquire
    with RunLock(str(folder)) as lock:
        owner = json.loads((folder / LOCK).read_text())
        assert lock.held and (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        assert owner["start"] == start_time(os.getpid()) and owner["since"][:4].isdigit()
    assert not (folder / LOCK).exists() and not lock.held
    lock.release()  # twice: nothing happens


def test_a_live_owner_here_or_any_owner_elsewhere_is_refused(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(UserError, match=rf"in use by a running run \(pid {os.getpid()} on "
                                            rf"{socket.gethostname()}\); wait for it to end"):
            RunLock(str(tmp_path)).acquire()
    write_owner(tmp_path, pid=dead_pid(), host="elsewhere", start=None)
    with pytest.raises(UserError, match=rf"in use by a run on host elsewhere .*delete {tmp_path}/{LOCK}"):
        RunLock(str(tmp_path)).acquire()


def test_a_dead_owners_lock_is_replaced(tmp_path):
    pid = dead_pid()
    assert not pid_alive(pid) and pid_alive(os.getpid()) and start_time(pid) is None
    write_owner(tmp_path, pid=pid, host=socket.gethostname(), start=123)
    with RunLock(str(tmp_path)) as lock:
        assert lock.held and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_an_unreadable_lock_is_being_written_when_new_and_stale_when_old(tmp_path):
    (tmp_path / LOCK).write_text("")  # a writer killed between create and write, or one still writing
    with pytest.raises(UserError, match="is being taken by another run"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    with RunLock(str(tmp_path)) as lock:
        assert lock.held


def test_a_release_that_fails_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    lock = RunLock(str(tmp_path))
    lock.acquire()

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(lock_module.os, "remove", read_only)
    with caplog.at_level(logging.WARNING, logger="rmt_peft"):
        lock.release()
    assert not lock.held and (tmp_path / LOCK).exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"could not remove the run lock {tmp_path}/{LOCK} (Read-only file system); the next start replaces it"]
