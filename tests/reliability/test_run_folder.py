"""The run folder survives kills, damage and a second run: atomic files, fallback from a damaged
checkpoint, stray temporary files cleaned, one run per folder (a stale lock does not block), and
a start that failed leaves the folder usable."""
import errno
import json
import os
import subprocess
import sys

import pytest

from rmt_peft.cli import main
from rmt_peft.errors import UserError
from rmt_peft.fileio import write_json
from rmt_peft.train import engine
from rmt_peft.train.curriculum import StageCallback
from rmt_peft.runs import LOCK_FILE
from rmt_peft.train.lock import RunLock
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import train_recipe

TWO_STAGES = {"curriculum.segments": [1, 2]}


class Killed(Exception):
    pass


def killed_run(write_recipe, monkeypatch, stage, step, name="run.yaml"):
    """A recipe whose run was killed after ``step`` of ``stage`` (see test_resume.py)."""
    recipe = load_recipe(write_recipe(TWO_STAGES, name=name))

    def on_step_end(self, args, state, control, **kwargs):
        if self.state.stage == stage and state.global_step == step:
            raise Killed()
    with monkeypatch.context() as patch:
        patch.setattr(StageCallback, "on_step_end", on_step_end, raising=False)
        with pytest.raises(Killed):
            train_recipe(recipe, log=lambda *_: None)
    recipe.training["resume_from_checkpoint"] = True
    return recipe


def error_line(capsys) -> str:
    """The command's error: its last line on stderr (progress bars may come before), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_lock_whose_pid_was_reused_by_another_process_is_stale(tmp_path):
    # this process is alive, but it started later than the owner the lock names: a reused pid
    with open(tmp_path / LOCK_FILE, "w") as f:
        json.dump({"pid": os.getpid(), "host": os.uname().nodename, "start": 1}, f)
    with RunLock(str(tmp_path)) as lock:
        assert lock.held and json.load(open(tmp_path / LOCK_FILE))["start"] != 1
    assert not (tmp_path / LOCK_FILE).exists()


def test_json_is_written_whole_and_never_with_nan(tmp_path):
    path = tmp_path / "summary.json"
    write_json(str(path), {"loss": 1.5})
    with pytest.raises(ValueError):
        write_json(str(path), {"loss": float("nan")})
    assert json.loads(path.read_text()) == {"loss": 1.5}  # the previous version stays
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(write_recipe, monkeypatch, damaged):
    recipe = killed_run(write_recipe, monkeypatch, stage=1, step=3)
    out = recipe.output_dir
    bad = os.path.join(out, "stage-1", "checkpoint-2")
    with open(os.path.join(bad, damaged), "r+b") as f:
        f.truncate(100)  # cut short, as a full disk leaves it
    stray = os.path.join(out, "stage-1", ".curriculum.json.tmp-abc")
    open(stray, "w").close()  # a writer killed before its rename
    lines = []
    summary = train_recipe(recipe, log=lines.append)
    assert any("skipping checkpoint" in line and damaged in line for line in lines)
    assert any(stray in line for line in lines) and not os.path.exists(stray)
    assert [s["steps"] for s in summary["stages"]] == [4, 4]  # stage 1 trained again from stage 0's end


@pytest.mark.slow
def test_an_empty_curriculum_file_is_skipped_and_a_named_damaged_checkpoint_is_one_line(
        write_recipe, monkeypatch, capsys):
    recipe = killed_run(write_recipe, monkeypatch, stage=0, step=3)
    checkpoint = os.path.join(recipe.output_dir, "stage-0", "checkpoint-2")
    open(os.path.join(checkpoint, "curriculum.json"), "w").close()  # the 0-byte file of issue 13
    path = write_recipe(TWO_STAGES, name="run.yaml")
    capsys.readouterr()
    assert main(["train", path, f"training.resume_from_checkpoint={checkpoint}"]) == 2
    assert error_line(capsys).count("curriculum.json is damaged") == 1
    summary = train_recipe(recipe, log=lambda *_: None)  # resume=true: no good checkpoint, start over
    assert [s["steps"] for s in summary["stages"]] == [4, 4]


@pytest.mark.slow
def test_one_run_per_folder_and_a_stale_lock_does_not_block_resume(write_recipe, monkeypatch, capsys):
    recipe = killed_run(write_recipe, monkeypatch, stage=1, step=3)
    path = write_recipe(TWO_STAGES, name="run.yaml")
    with RunLock(recipe.output_dir):  # a live owner: this process
        assert main(["train", path, "training.resume_from_checkpoint=true"]) == 2
        assert f"in use by a running run (pid {os.getpid()}" in capsys.readouterr().err
        fresh = write_recipe(TWO_STAGES, name="fresh.yaml")
        with RunLock(load_recipe(fresh).output_dir):  # two fresh starts: the second finds the first's lock
            assert main(["train", fresh]) == 2
        assert "in use" in capsys.readouterr().err
        with pytest.raises(UserError, match="in use"):
            RunLock(recipe.output_dir).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = os.path.join(recipe.output_dir, LOCK_FILE)
    with open(lock, "w") as f:  # what kill -9 leaves: the lock of a dead pid
        json.dump({"pid": dead.pid, "host": os.uname().nodename}, f)
    assert main(["train", path, "training.resume_from_checkpoint=true"]) == 0
    assert not os.path.exists(lock)
    assert json.load(open(os.path.join(recipe.output_dir, "summary.json")))["status"] == "completed"


@pytest.mark.slow
def test_a_failed_start_leaves_the_folder_usable_and_disk_full_is_one_line(write_recipe, monkeypatch, capsys):
    path = write_recipe(TWO_STAGES, name="run.yaml")
    out = load_recipe(path).output_dir

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_file", disk_full)
        assert main(["train", path]) == 2
    err = error_line(capsys)
    assert "no space left" in err and "trainable.safetensors" in err
    assert not [n for n in os.listdir(os.path.join(out, "stage-0", "checkpoint-2")) if ".tmp-" in n]
    # the stage-0 checkpoint save failed: nothing was kept, so a fresh start is allowed
    assert main(["train", path]) == 0


@pytest.mark.slow
def test_torch_save_failing_on_a_full_disk_is_one_line_and_the_run_resumes(write_recipe, monkeypatch, capsys):
    import torch

    path = write_recipe(TWO_STAGES, name="run.yaml")

    def full(*args, **kwargs):  # what torch's zip writer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2304 vs 2198")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full)
        assert main(["train", path]) == 2
    assert "is the disk full?" in error_line(capsys)
    assert main(["train", path, "training.resume_from_checkpoint=true"]) == 0
