"""Files that are whole or absent: atomic writes and the clean-up of what a killed writer left.

A file a run depends on (curriculum.json, summary.json, recipe.yaml, trainable.safetensors, ...)
is written to a temporary file in the same folder and renamed over the target: a kill or a full
disk leaves the previous version (or nothing), never half of one. The temporary names start with
``.`` and contain ``TEMP_MARK`` so ``remove_temp_files`` can find what a killed writer left.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

from .errors import UserError

TEMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; once the block succeeds it replaces ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARK}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are meant to be read
        os.replace(tmp, path)
    except OSError as err:
        raise disk_error(err, path) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, data) -> None:
    """JSON that any reader accepts: NaN and infinities are refused rather than written."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def disk_error(err: OSError, path: str) -> OSError:
    """``err`` as a UserError naming ``path`` when the disk is full or the folder is not writable."""
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on the device while writing {path}: free some space and run again "
                         f"(nothing half-written was kept)")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return UserError(f"cannot write {path}: {os.strerror(err.errno)}; choose a writable folder")
    return err


def check_writable(folder: str, key: str) -> None:
    """Raise a UserError naming ``key`` when ``folder`` (or the nearest existing parent) cannot be written."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{key}={folder!r}: {probe} is a file; expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key}={folder!r}: {probe} is not writable; choose a writable folder")


def remove_temp_files(folder: str) -> list[str]:
    """Delete the temporary files and folders of writers killed before their rename, under ``folder``."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            if name.startswith(".") and TEMP_MARK in name:
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                    dirs.remove(name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
    return removed
