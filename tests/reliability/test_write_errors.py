"""Every write that fails for want of space or permission is one line with exit code 2, in every
command, whoever reports it (OSError, safetensors' SafetensorError, matplotlib), and a failure while
cleaning up (the lock of a read-only folder) never hides it. The writers are made to fail (as root,
chmod does not stop a write); nothing half-written is left."""
import errno
import os
import shutil

import pytest
from safetensors import SafetensorError

from rmt_peft import MemoryConfig, RMTModel, memory_state, saving
from rmt_peft.cli import main
from rmt_peft.fileio import atomic_path, disk_error
from rmt_peft.errors import UserError
from rmt_peft.tiny_models import save_tiny_model, tiny_model
from rmt_peft import runs
from rmt_peft.train import lock as lock_module
from rmt_peft.train import engine

FAILURES = {  # errno: (what the writer raises, what the line says)
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "too large",
    errno.EROFS: "read-only",
    errno.EACCES: "permission denied",
    errno.EDQUOT: "quota",
}


def raiser(number, kind="os"):
    def write(*args, **kwargs):
        if kind == "safetensors":  # the text safetensors gives (its error is not an OSError)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(number)} (os error {number}) "
                                  f"at path \"/x/.tmpab\"")
        raise OSError(number, os.strerror(number), "/x/file")
    return write


def one_line(capsys, expected):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert expected in last and last.startswith("rmt-peft "), err
    return last


def no_temp_files(folder):
    return not [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if ".tmp-" in n]


@pytest.mark.parametrize("number", list(FAILURES))
@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_disk_error_names_the_file_for_every_failure(number, kind):
    with pytest.raises(Exception) as caught:
        raiser(number, kind)()
    problem = disk_error(caught.value, "out/model.safetensors")
    assert isinstance(problem, UserError) and FAILURES[number] in str(problem)
    assert "out/model.safetensors" in str(problem)
    other = OSError(errno.EIO, "I/O error")
    assert disk_error(other) is other  # not a matter of space or permission: left as it is


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EFBIG])
def test_ask_save_memory_on_a_full_disk(trained_run, tmp_path, monkeypatch, capsys, number):
    document = tmp_path / "doc.txt"
    document.write_text("Mary went to the kitchen .\n")
    monkeypatch.setattr(memory_state, "save_file", raiser(number, "safetensors"))
    target = tmp_path / "out" / "doc.mem.safetensors"
    assert main(["ask", str(trained_run), "--document", str(document), "--question", "q",
                 "--save-memory", str(target), "--no-progress"]) == 2
    assert str(target) in one_line(capsys, FAILURES[number])
    assert not target.exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS])
def test_eval_png_writer_on_a_full_disk(trained_run, tmp_path, monkeypatch, capsys, number):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", raiser(number))
    out = tmp_path / "eval"
    assert main(["eval", str(trained_run), "--segments", "1", "--samples", "2", "--no-progress",
                 "--out", str(out)]) == 2
    one_line(capsys, FAILURES[number])
    assert not out.exists() and no_temp_files(tmp_path)  # nothing half-written


@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_export_copy_and_merge_on_a_full_disk(trained_run, tmp_path, monkeypatch, capsys, kind):
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copy2", raiser(errno.ENOSPC))
        assert main(["export", str(trained_run), "--to", str(tmp_path / "copy")]) == 2
    one_line(capsys, "no space left")
    # --merge: a LoRA adapter on a tiny base saved as a checkpoint
    base = save_tiny_model(str(tmp_path / "base"), "gpt_neo")
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=8),
                                 lora="attention")
    rmt.save_pretrained(str(tmp_path / "adapter"), base_model=base)
    monkeypatch.setattr(saving, "save_file", raiser(errno.ENOSPC, kind))
    assert main(["export", str(tmp_path / "adapter"), "--to", str(tmp_path / "merged"), "--merge",
                 "--quantization", "none", "--dtype", "float32"]) == 2
    one_line(capsys, "no space left")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "copy").exists() and no_temp_files(tmp_path)


def test_a_lock_that_cannot_be_removed_never_hides_the_first_error(write_recipe, monkeypatch, capsys):
    """A folder that became read-only mid-run: the save fails, then so does removing the lock."""
    path = write_recipe({"curriculum.segments": [1], "curriculum.steps_per_stage": 2})
    real_remove = os.remove

    def remove(target, *args, **kwargs):
        if os.path.basename(str(target)) == runs.LOCK_FILE:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real_remove(target, *args, **kwargs)
    monkeypatch.setattr(engine, "save_file", raiser(errno.EROFS, "safetensors"))
    monkeypatch.setattr(lock_module.os, "remove", remove)
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "read-only" in err.strip().splitlines()[-1], err
    assert "could not remove the run lock" in err


def test_a_failed_clean_up_of_an_atomic_write_never_hides_its_error(tmp_path, monkeypatch):
    real_remove = os.remove

    def remove(target, *args, **kwargs):
        if ".tmp-" in str(target):
            raise OSError(errno.EROFS, "Read-only file system", str(target))
        return real_remove(target, *args, **kwargs)
    monkeypatch.setattr(os, "remove", remove)
    with pytest.raises(UserError, match="no space left"):
        with atomic_path(str(tmp_path / "summary.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
