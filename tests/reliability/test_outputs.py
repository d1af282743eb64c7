"""No command writes into, or deletes, what it does not own (runs.check_output, issue 27): the five
data-loss paths, each command that writes, and the kill point of a run's very first write."""
import json
import os
import shutil

import pytest

from rmt_peft import runs
from rmt_peft.runs import check_output
from rmt_peft.cli import main
from rmt_peft.errors import UserError
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import train_recipe


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return sorted((os.path.relpath(os.path.join(root, n), folder), os.path.getsize(os.path.join(root, n)),
                   os.path.getmtime(os.path.join(root, n))) for root, _, files in os.walk(folder) for n in files)


def one_line(capsys, expected):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err
    return err


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Mary went to the kitchen . John picked up the football .\n" * 4)
    return path


def test_export_to_an_empty_path_or_the_current_folder_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    # data-loss path 1: --to "" replaced the current folder
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    for to, expected in (("", "--to is empty"), (".", "is the current folder"), ("..", "is the current folder")):
        for extra in ([], ["--overwrite"]):
            assert main(["export", str(trained_run), "--to", to, *extra]) == 2
            one_line(capsys, expected)
    assert os.listdir(work) == ["mine.txt"]


def test_save_memory_never_replaces_a_runs_weights(trained_run, document, capsys):
    # data-loss path 2: --save-memory RUN/final/memory.safetensors replaced the trained memory
    before = snapshot(trained_run)
    for target in ("final/memory.safetensors", "final/new.safetensors", "stage-0/checkpoint-1/x.safetensors",
                   "summary.json"):
        for extra in ([], ["--overwrite"]):
            assert main(["ask", str(trained_run), "--document", str(document), "--question", "q",
                         "--save-memory", str(trained_run / target), *extra]) == 2
            one_line(capsys, "is part of the training run")
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("target", ["stage-0", "stage-0/checkpoint-1", "logs", "final", "best", "baseline", "."])
def test_export_overwrite_never_reaches_into_a_run(trained_run, tmp_path, target, capsys):
    # data-loss path 3: --to RUN/stage-0, RUN/stage-0/checkpoint-N or RUN/logs with --overwrite
    before = snapshot(trained_run)
    source = tmp_path / "adapter"
    shutil.copytree(trained_run / "final", source)  # another source: only the target protects the run
    assert main(["export", str(source), "--to", str(trained_run / target), "--overwrite"]) == 2
    one_line(capsys, "is a training run" if target == "." else "is part of the training run")
    assert snapshot(trained_run) == before


def test_export_into_a_run_folder_or_over_a_folder_holding_one(trained_run, tmp_path, capsys):
    source = tmp_path / "adapter"
    shutil.copytree(trained_run / "final", source)
    assert main(["export", str(source), "--to", str(trained_run / "exported")]) == 2
    one_line(capsys, "lies inside the training run")
    assert not (trained_run / "exported").exists()
    holder = tmp_path / "holder"
    shutil.copytree(trained_run, holder / "runs" / "run")
    before = snapshot(holder)
    assert main(["export", str(source), "--to", str(holder), "--overwrite"]) == 2
    one_line(capsys, "holds the training run")
    assert snapshot(holder) == before


def test_save_memory_over_an_existing_file_needs_overwrite(trained_run, document, tmp_path, capsys):
    # data-loss path 4: --save-memory EXISTING_FILE overwrote it
    target = tmp_path / "notes.safetensors"
    target.write_text("mine")
    ask = ["ask", str(trained_run), "--document", str(document), "--question", "Where", "--save-memory", str(target)]
    assert main(ask) == 2
    one_line(capsys, "already exists")
    assert target.read_text() == "mine"
    assert main(ask + ["--overwrite"]) == 0
    assert target.stat().st_size > 100 and oct(target.stat().st_mode & 0o777) == "0o644"
    capsys.readouterr()
    assert main(["ask", str(trained_run), "--document", str(document), "--question", "q",
                 "--save-memory", str(tmp_path)]) == 2
    one_line(capsys, "is a folder; expected a file")


def test_eval_never_overwrites_an_earlier_evaluation(trained_run, tmp_path, capsys):
    # data-loss path 5: the default RUN/eval was silently replaced; now the next one goes beside it
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    argv = ["eval", str(run), "--segments", "1", "--samples", "2", "--no-progress"]
    assert main(argv) == 0
    first = snapshot(run / "eval")
    assert json.loads(capsys.readouterr().out)["out"] == str(run / "eval")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(run / "eval-2")
    assert snapshot(run / "eval") == first and "metrics.json" in os.listdir(run / "eval-2")
    assert main(argv + ["--out", str(run / "eval")]) == 2
    one_line(capsys, "already holds files")
    assert main(argv + ["--out", str(run / "eval"), "--overwrite"]) == 0
    assert snapshot(run / "eval") != first and not [n for n in os.listdir(run) if ".tmp-" in n]
    capsys.readouterr()
    (tmp_path / "a_file").write_text("x")
    for out, expected in ((tmp_path / "a_file", "is a file; expected a folder"),
                          (run / "stage-0", "is part of the training run"),
                          (run / "new", "lies inside the training run")):
        assert main(argv + ["--out", str(out)]) == 2
        one_line(capsys, expected)
    assert (tmp_path / "a_file").read_text() == "x"


def test_train_output_dir_is_not_the_current_folder_nor_inside_a_run(write_recipe, trained_run, tmp_path,
                                                                      monkeypatch, capsys):
    path = write_recipe()
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    for out, expected in ((".", "is the current folder"), (str(trained_run / "stage-0"), "inside the training run"),
                          (str(trained_run / "more"), "inside the training run")):
        for command in ("validate", "train"):
            assert main([command, path, f"training.output_dir={out}"]) == 2
            one_line(capsys, expected)
    assert os.listdir(work) == [] and not (trained_run / "more").exists()


def test_check_output_names_the_flag_and_allows_new_paths(tmp_path):
    runs.check_output(str(tmp_path / "new" / "folder"), "--to", folder=True)
    runs.check_output(str(tmp_path / "new.safetensors"), "--save-memory", folder=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="--to .*full already holds files"):
        runs.check_output(str(tmp_path / "full"), "--to", folder=True)
    runs.check_output(str(tmp_path / "full"), "--to", True, folder=True)


@pytest.mark.slow
def test_a_run_killed_during_its_first_write_starts_and_resumes_cleanly(write_recipe, tmp_path):
    """Killed while writing recipe.yaml: only its temporary file and the lock are left. Before, a
    fresh start said 'already holds files' and a resume 'holds no run to resume'."""
    path = write_recipe({"curriculum.segments": [1], "curriculum.steps_per_stage": 2}, name="first.yaml")
    recipe = load_recipe(path)
    out = recipe.output_dir
    for resume in (False, True):
        os.makedirs(out)
        open(os.path.join(out, ".recipe.yaml.tmp-x1y2"), "w").close()
        with open(os.path.join(out, runs.LOCK_FILE), "w") as f:
            json.dump({"pid": 999999999, "host": os.uname().nodename}, f)  # a dead owner
        recipe.training["resume_from_checkpoint"] = resume
        summary = train_recipe(recipe, log=lambda *_: None)
        assert summary["status"] == "completed" and [s["steps"] for s in summary["stages"]] == [2]
        assert not [n for n in os.listdir(out) if ".tmp-" in n or n == runs.LOCK_FILE]
        shutil.rmtree(out)


def test_saved_weights_are_readable_by_all(trained_run):
    # safetensors writes its files 0600; a saved model is meant to be shared, like the rest of the run
    for folder in ("final", "stage-0/end", "stage-0/checkpoint-1"):
        for name in os.listdir(trained_run / folder):
            mode = (trained_run / folder / name).stat().st_mode & 0o777
            assert mode == 0o644, (folder, name, oct(mode))


@pytest.mark.parametrize("left", [
    [".recipe.yaml.tmp-ab12", runs.LOCK_FILE],                    # killed in the first write
    ["recipe.yaml", "stage-0/", "logs/events.out.tfevents.1"],     # killed before the first checkpoint
    ["recipe.yaml", "stage-0/checkpoint-2/optimizer.pt", "stage-0/.curriculum.json.tmp-x"],  # in its first save
])
def test_what_a_kill_before_the_first_save_leaves_never_blocks_a_start_or_a_resume(write_recipe, left):
    from rmt_peft.runs import check_start

    recipe = load_recipe(write_recipe(name="killed.yaml"))
    for path in left:
        target = os.path.join(recipe.output_dir, path)
        os.makedirs(os.path.dirname(target) if not path.endswith("/") else target, exist_ok=True)
        if not path.endswith("/"):
            open(target, "w").close()
    assert check_start(recipe.output_dir, resume=False) is False  # a fresh start is allowed
    resumes = check_start(recipe.output_dir, resume=True)  # a resume goes on, or starts afresh without a recipe.yaml
    assert resumes is ("recipe.yaml" in left)
    (open(os.path.join(recipe.output_dir, "notes.txt"), "w")).close()  # a file of the user's: refused
    with pytest.raises(UserError, match="already holds files"):
        check_start(recipe.output_dir, resume=False)


def test_overwrite_never_reaches_into_a_runs_baseline_run_either(tmp_path):
    run = tmp_path / "run"
    for folder in (run / "final", run / "baseline" / "stage-0"):
        folder.mkdir(parents=True)
    for recipe in (run / "recipe.yaml", run / "baseline" / "recipe.yaml"):
        recipe.write_text("model: {}\n")
    with pytest.raises(UserError, match=r"is part of the training run .*run \(its baseline\)"):
        check_output(str(run / "baseline" / "mine.safetensors"), "--save-memory", True, folder=False)
    check_output(str(run / "mine.safetensors"), "--save-memory", True, folder=False)  # with --overwrite: allowed
