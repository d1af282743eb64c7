"""Files that are whole or absent: atomic writes and the clean-up of what a killed writer left.

A file a run depends on (its progress, summary, recipe, trainable tensors, ...)
is written to a temporary file in the same folder and renamed over the target: a kill or a full
disk leaves the previous version (or nothing), never half of one. The temporary names start with
``.`` and contain ``TEMP_MARK`` so ``remove_temp_files`` can find what a killed writer left. A
folder (a saved model) is written the same way: ``atomic_directory``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile

from safetensors import SafetensorError, safe_open

from .errors import UserError

TEMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; once the block succeeds it replaces ``path``. A write
    that fails for want of space or permission is a UserError naming ``path`` (``disk_error``)."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARK}", dir=folder)
    except OSError as err:
        raise disk_error(err, path) from err
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are meant to be read
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise disk_error(err, path) from err
    finally:
        # a failed clean-up (the folder became read-only) must not hide the error of the write
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a temporary folder beside ``target``; on success it replaces ``target``."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"cannot save to {target}: it exists and is not a folder")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{TEMP_MARK}", dir=parent)
    try:
        yield tmp
        # mkdtemp makes the folder private and safetensors its files (0600); a saved model is meant to be shared
        os.chmod(tmp, 0o755)
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        if os.path.exists(target):
            old = tmp + ".old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # put the previous save back
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new save is in place; a leftover is a temp file
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, data) -> None:
    """JSON that any reader accepts: NaN and infinities are refused rather than written."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def safetensors_problem(path: str) -> str | None:
    """Why the header of the safetensors file ``path`` cannot be read (missing, cut short, not
    safetensors), or None: a cheap check that reads no tensor."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors' own error types, one per kind of damage
        return str(err)
    return None


# errno -> what the line says; EFBIG: a file over the file system's or the shell's limit (ulimit -f)
WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EFBIG: "the file is too large for this file system (or over the shell's ulimit -f)",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


def error_number(err: BaseException) -> int | None:
    """The errno of an OSError, or of a write error safetensors reports as text ("(os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        found = re.search(r"os error (\d+)", str(err))
        return int(found.group(1)) if found else None
    return None


def disk_error(err: BaseException, path: str | None = None) -> BaseException:
    """``err`` as a UserError naming the file when it is a write that failed for want of space or
    permission (``WRITE_FAILURES``; OSError or safetensors' SafetensorError); else ``err`` itself."""
    number = error_number(err)
    if number not in WRITE_FAILURES:
        return err
    path = path or getattr(err, "filename", None) or "a file"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{WRITE_FAILURES[number]} while writing {path}: free some space and run again "
                         f"(nothing half-written was kept)")
    if number == errno.EFBIG:
        return UserError(f"cannot write {path}: {WRITE_FAILURES[number]}")
    return UserError(f"cannot write {path}: {WRITE_FAILURES[number]}; choose a writable folder")


def check_writable(folder: str, key: str, given: str | None = None) -> None:
    """Raise a UserError naming ``key`` when ``folder`` (or the nearest existing parent) cannot be
    written. A file is created there and removed: permissions alone miss read-only mounts and
    pseudo file systems (/proc), and say nothing for root. ``given``: the path the user gave, when
    ``folder`` is the one it would be written in."""
    given = folder if given is None else given
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{key}={given!r}: {probe} is a file; expected a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".rmt-peft-probe{TEMP_MARK}", dir=probe)
    except OSError as err:
        raise UserError(f"{key}={given!r}: {probe} is not writable ({os.strerror(err.errno or 0)}); choose a "
                        f"writable folder") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(tmp)


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
