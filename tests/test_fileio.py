"""Files that are whole or absent (rmt_peft/fileio.py): atomic files and folders, JSON without NaN,
write failures as one line naming the file, the writable-folder probe, and the clean-up of what a
killed writer left. Every command's use of them is tests/reliability/'s."""
import errno
import json
import os
import stat

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from rmt_peft.errors import UserError
from rmt_peft.fileio import (TEMP_MARK, atomic_directory, atomic_path, check_writable, disk_error, error_number,
                             remove_temp_files, safetensors_problem, write_json, write_text)


def test_an_atomic_file_replaces_the_old_one_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "state.txt"
    write_text(str(path), "one")  # the folder is made
    assert path.read_text() == "one" and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path / "sub") and TEMP_MARK in os.path.basename(tmp)
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "one" and os.listdir(tmp_path / "sub") == ["state.txt"]


def test_json_is_indented_and_never_holds_nan(tmp_path):
    path = tmp_path / "summary.json"
    write_json(str(path), {"loss": 1.5, "steps": [1, 2]})
    assert path.read_text() == '{\n  "loss": 1.5,\n  "steps": [\n    1,\n    2\n  ]\n}\n'
    with pytest.raises(ValueError):
        write_json(str(path), {"loss": float("inf")})
    assert json.loads(path.read_text()) == {"loss": 1.5, "steps": [1, 2]}


def test_an_atomic_folder_replaces_the_old_one_whole_and_is_readable_by_all(tmp_path):
    target = tmp_path / "saved"
    with atomic_directory(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, "inner"))
        open(os.path.join(tmp, "inner", "a.bin"), "w").write("new")
    assert (target / "inner" / "a.bin").read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(target / "inner" / "a.bin").st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)) as tmp:
            open(os.path.join(tmp, "b.bin"), "w").write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["saved"] and os.listdir(target) == ["inner"]  # the old save, nothing beside it
    with atomic_directory(str(target)) as tmp:
        open(os.path.join(tmp, "c.bin"), "w").write("again")
    assert os.listdir(target) == ["c.bin"] and os.listdir(tmp_path) == ["saved"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        with atomic_directory(str(tmp_path / "file")):
            pass


@pytest.mark.parametrize("number, words", [
    (errno.ENOSPC, "no space left on the device while writing out/a.json: free some space"),
    (errno.EDQUOT, "the disk quota is exceeded while writing out/a.json"),
    (errno.EFBIG, "cannot write out/a.json: the file is too large for this file system"),
    (errno.EROFS, "cannot write out/a.json: the file system is read-only; choose a writable folder"),
    (errno.EACCES, "cannot write out/a.json: permission denied; choose a writable folder"),
])
def test_a_write_that_fails_for_space_or_permission_is_a_user_error_naming_the_file(number, words):
    for err in (OSError(number, os.strerror(number)),
                SafetensorError(f"Error while serializing: I/O error: x (os error {number})")):
        assert error_number(err) == number
        found = disk_error(err, "out/a.json")
        assert isinstance(found, UserError) and str(found).startswith(words), str(found)


def test_without_a_path_the_line_names_the_errors_own_file_or_a_file():
    assert str(disk_error(OSError(errno.ENOSPC, "full", "/x/f"))).startswith("no space left on the device while "
                                                                             "writing /x/f:")
    assert str(disk_error(OSError(errno.EROFS, "read-only"))) == ("cannot write a file: the file system is read-only; "
                                                                 "choose a writable folder")


def test_other_errors_are_left_as_they_are():
    for err in (OSError(errno.EIO, "I/O error"), SafetensorError("header too large"), ValueError("x")):
        assert disk_error(err, "a") is err
    assert error_number(ValueError("os error 28")) is None


def test_an_atomic_write_on_a_full_disk_is_a_user_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "a.json"
    with pytest.raises(UserError, match=f"no space left on the device while writing {path}"):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_a_folder_is_writable_or_named_with_its_key(tmp_path):
    check_writable(str(tmp_path / "new" / "deeper"), "--out")  # the nearest existing parent is probed
    assert os.listdir(tmp_path) == []  # the probe is removed, nothing is created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=rf"^--out='{tmp_path}/file/sub': {tmp_path}/file is a file; expected a folder$"):
        check_writable(str(tmp_path / "file" / "sub"), "--out")
    with pytest.raises(UserError, match=r"^training.output_dir='/proc/run': /proc is not writable"):
        check_writable("/proc/run", "training.output_dir")


def test_a_safetensors_file_is_checked_from_its_header(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good))
    assert safetensors_problem(str(good)) is None
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:12])
    (tmp_path / "text.safetensors").write_text("not safetensors")
    for name in ("cut.safetensors", "text.safetensors", "missing.safetensors"):
        assert safetensors_problem(str(tmp_path / name)), name


def test_what_killed_writers_left_is_removed_and_nothing_else(tmp_path):
    (tmp_path / "stage-0" / f".checkpoint-2{TEMP_MARK}abc").mkdir(parents=True)
    (tmp_path / "stage-0" / f".checkpoint-2{TEMP_MARK}abc" / "model.safetensors").write_text("x")
    (tmp_path / f".summary.json{TEMP_MARK}x1").write_text("{")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / ".hidden").write_text("mine")
    (tmp_path / f"visible{TEMP_MARK}name").write_text("mine too")  # temporary names start with a dot
    removed = remove_temp_files(str(tmp_path))
    assert sorted(removed) == sorted([str(tmp_path / "stage-0" / f".checkpoint-2{TEMP_MARK}abc"),
                                      str(tmp_path / f".summary.json{TEMP_MARK}x1")])
    left = sorted(os.path.relpath(os.path.join(r, n), tmp_path) for r, ds, fs in os.walk(tmp_path) for n in ds + fs)
    assert left == [".hidden", "stage-0", "summary.json", f"visible{TEMP_MARK}name"]
