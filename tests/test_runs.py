"""The run folder (rmt_peft/runs.py): its names and paths, what a folder is, where a run may start
or resume, which save a resume takes, the best weights, and where other commands may write. The
end-to-end checks (kills, damage, full disks, every command that writes) are tests/reliability/'s."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from rmt_peft import runs
from rmt_peft.errors import UserError
from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.runs import check_start


def save(folder, state=None, extra=()):
    """A finished checkpoint or end/: trainable tensors, the Trainer's files, then curriculum.json."""
    os.makedirs(folder, exist_ok=True)
    save_file({"w": torch.zeros(2)}, os.path.join(folder, "trainable.safetensors"))
    torch.save({"step": 1}, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": 1}, f)
    for name in extra:
        open(os.path.join(folder, name), "w").close()
    if state is not None:
        runs.write_state(folder, state)
    return str(folder)


def test_the_paths_of_a_run(tmp_path):
    run = str(tmp_path / "run")
    assert runs.recipe_path(run) == f"{run}/recipe.yaml" and runs.summary_path(run) == f"{run}/summary.json"
    assert (runs.final_dir(run), runs.baseline_dir(run), runs.best_dir(run), runs.log_dir(run), runs.lock_path(run)) == (
        f"{run}/final", f"{run}/baseline", f"{run}/best", f"{run}/logs", f"{run}/.rmt-peft.lock")
    assert runs.end_dir(run, 2) == f"{run}/stage-2/end"
    assert runs.checkpoint_dir(runs.stage_dir(run, 0), 40) == f"{run}/stage-0/checkpoint-40"
    assert runs.is_stage_end(runs.end_dir(run, 2) + "/") and not runs.is_stage_end(f"{run}/stage-0/checkpoint-40")
    for name in ("trainable.safetensors", "curriculum.json", "optimizer.pt", "rng_state_3.pth", "scheduler.pt"):
        assert runs.is_resume_file(name), name
    for name in ("adapter_model.safetensors", "memory.safetensors", "README.md", "rng_state.json"):
        assert not runs.is_resume_file(name), name
    assert runs.seed_of({}) == 42 and runs.seed_of({"seed": "7"}) == 7


def test_what_a_folder_is(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert not runs.is_run(str(run)) and runs.run_folder(str(run / "final")) is None
    (run / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    (run / "summary.json").write_text('{"status": "completed"}')
    assert runs.is_run(str(run)) and runs.run_folder(str(run / "final")) == str(run)
    assert runs.run_recipe(str(run / "final")) == str(run / "recipe.yaml")
    assert runs.is_run_final(str(run / "final")) and not runs.is_run_final(str(run))
    assert runs.read_run(str(run)) == ({"model": {"name_or_path": "x"}}, {"status": "completed"})
    assert runs.read_run(str(tmp_path)) == ({}, {}) and runs.read_run(None) == ({}, {})
    # a legend name: the run's name for its final/, made unique
    assert runs.model_name(str(run / "final"), []) == "run"
    assert runs.model_name(str(run / "final"), ["run"]) == "run (baseline)"
    assert runs.model_name("adapters/neo/", []) == "neo"


def test_the_furthest_usable_save_is_where_a_resume_goes_on(tmp_path):
    run = str(tmp_path)
    assert runs.find_resume_point(run, 3) is None
    save(runs.end_dir(run, 0), {"stage": 1})
    stage1 = runs.stage_dir(run, 1)
    for step in (2, 4, 10):
        save(runs.checkpoint_dir(stage1, step), {"stage": 1, "step": step})
    save(runs.checkpoint_dir(stage1, 12))  # cut off before curriculum.json: not finished
    assert [s for s, _ in runs.checkpoints(stage1)] == [12, 10, 4, 2]
    assert runs.find_resume_point(run, 3) == runs.checkpoint_dir(stage1, 10)
    assert runs.read_state(runs.checkpoint_dir(stage1, 10)) == {"stage": 1, "step": 10}
    assert runs.latest_checkpoint(stage1, before=10) == runs.checkpoint_dir(stage1, 4)
    # a damaged newer save is named in the log and skipped for the previous good one
    with open(os.path.join(runs.checkpoint_dir(stage1, 10), "optimizer.pt"), "wb") as f:
        f.write(b"PK\x03\x04cut")
    said = []
    assert runs.find_resume_point(run, 3, log=said.append) == runs.checkpoint_dir(stage1, 4)
    assert len(said) == 1 and "skipping checkpoint" in said[0] and "optimizer.pt is damaged" in said[0]
    # a finished later stage wins over every checkpoint before it
    save(runs.end_dir(run, 1), {"stage": 2})
    assert runs.find_resume_point(run, 3) == runs.end_dir(run, 1)


def test_damage_names_the_file_that_cannot_be_read(tmp_path):
    folder = save(tmp_path / "checkpoint-1", {"stage": 0})
    assert runs.damage(folder) is None
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        f.write('{"global_step": ')
    assert runs.damage(folder).startswith(f"{folder}/trainer_state.json is damaged")
    folder = save(tmp_path / "checkpoint-2", {"stage": 0})
    os.remove(os.path.join(folder, "trainable.safetensors"))
    assert runs.damage(folder).startswith(f"{folder}/trainable.safetensors is missing or damaged")
    folder = save(tmp_path / "checkpoint-3", {"stage": 0})
    # fields the reader does not take (a save of another version)
    assert "curriculum.json is damaged (TypeError" in runs.damage(folder, build=lambda step: step)
    with open(os.path.join(folder, "curriculum.json"), "w") as f:
        f.write("")
    with pytest.raises(UserError, match=r"curriculum.json is damaged \(JSONDecodeError.*resume from an earlier"):
        runs.read_state(folder)


def test_checkpoints_saved_after_a_divergence_began_are_set_aside(tmp_path):
    stage = str(tmp_path / "stage-0")
    for step in (2, 4, 6):
        save(runs.checkpoint_dir(stage, step), {"stage": 0})
    said = []
    runs.set_aside_suspect_checkpoints(stage, 4, said.append)
    assert sorted(os.listdir(stage)) == ["checkpoint-2", "suspect-checkpoint-4", "suspect-checkpoint-6"]
    assert [s for s, _ in runs.checkpoints(stage)] == [2] and len(said) == 2


def test_a_run_saved_something_worth_keeping_once_a_save_finished(tmp_path):
    run = tmp_path / "run"
    assert not runs.saved_progress(str(run))
    (run / "stage-0" / "checkpoint-2").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "recipe.yaml").write_text("")
    assert not runs.saved_progress(str(run))  # an unfinished save, logs, the recipe
    (run / "stage-0" / "checkpoint-2" / "curriculum.json").write_text("{}")
    assert runs.saved_progress(str(run))
    other = tmp_path / "other"
    (other / "baseline" / "stage-1" / "end").mkdir(parents=True)
    (other / "baseline" / "stage-1" / "end" / "curriculum.json").write_text("{}")
    assert runs.saved_progress(str(other))  # the baseline run's progress counts
    assert runs.has_started(str(run)) and not runs.has_started(str(other))


def test_a_failed_start_is_removed_only_when_it_wrote_nothing_but_its_recipe(tmp_path):
    out = tmp_path / "run"
    (out / "stage-0").mkdir(parents=True)
    (out / "recipe.yaml").write_text("")
    runs.remove_failed_start(str(out))
    assert not out.exists()
    (out / "logs").mkdir(parents=True)
    (out / "recipe.yaml").write_text("")
    (out / "logs" / "events").write_text("")
    runs.remove_failed_start(str(out))
    assert sorted(os.listdir(out)) == ["logs", "recipe.yaml"]
    runs.remove_failed_start(str(tmp_path / "missing"))  # nothing to do


def test_start_and_resume_in_an_empty_or_missing_folder(tmp_path):
    assert check_start(str(tmp_path / "new"), resume=False) is False
    with pytest.raises(RecipeError, match="resume_from_checkpoint is set but .*new' holds no run to resume$"):
        check_start(str(tmp_path / "new"), resume=True)
    (tmp_path / "empty").mkdir()
    assert check_start(str(tmp_path / "empty"), resume=True) is False  # nothing to resume: a fresh start
    assert check_start(str(tmp_path / "empty"), resume="path/to/checkpoint") is False


def test_the_best_weights_are_swapped_in_whole(tmp_path):
    run = str(tmp_path)
    assert runs.read_kept(run) is None

    def weights(text):
        def write(folder):
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, "w.bin"), "w").write(text)
        return write

    runs.save_best(run, weights("first"), {"accuracy": 0.5}, should_save=True)
    runs.save_best(run, weights("second"), {"accuracy": 0.75}, should_save=True)
    assert runs.read_kept(run) == {"accuracy": 0.75}
    assert open(os.path.join(runs.best_dir(run), "w.bin")).read() == "second"
    assert sorted(os.listdir(run)) == ["best"]  # no temporary folder left
    with open(os.path.join(runs.best_dir(run), "kept.json"), "w") as f:
        f.write("{")
    with pytest.raises(UserError, match=r"kept.json is damaged .*delete .*best"):
        runs.read_kept(run)


def test_eval_writes_to_a_free_eval_folder(tmp_path):
    assert runs.free_eval_dir(str(tmp_path)) == str(tmp_path / "eval")
    (tmp_path / "eval").mkdir()
    assert runs.free_eval_dir(str(tmp_path)) == str(tmp_path / "eval")  # empty: free
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    (tmp_path / "eval-2").write_text("a file")
    assert runs.free_eval_dir(str(tmp_path)) == str(tmp_path / "eval-3")


def test_the_run_that_holds_a_path_and_where_training_may_start(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "a"
    (run / "stage-0").mkdir(parents=True)
    (run / "recipe.yaml").write_text("")
    assert runs.enclosing_run(str(run / "stage-0" / "x")) == str(run)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "recipe.yaml").write_text("")  # a recipe of the user's, nothing trained beside it
    assert runs.enclosing_run(str(tmp_path / "mine" / "out")) is None
    runs.check_train_output(str(tmp_path / "runs" / "b"))
    with pytest.raises(UserError, match=r"training.output_dir=.* lies inside the training run .*a; choose a folder"):
        runs.check_train_output(str(run / "sub"))
    monkeypatch.chdir(run / "stage-0")
    with pytest.raises(UserError, match="is the current folder or holds it"):
        runs.check_train_output(str(tmp_path / "runs"))


def test_output_dir_holding_another_run_is_never_overwritten(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    os.makedirs(recipe.output_dir)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(RecipeError, match="already holds files"):
        check_start(recipe.output_dir, resume=False)
    with pytest.raises(RecipeError, match="no run to resume"):
        check_start(recipe.output_dir, resume=True)
