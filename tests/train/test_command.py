"""``rmt-peft train``, ``validate`` and ``recipes``: a model that cannot load is one line, a
failed start leaves no folder behind, a run that failed after training began keeps what it wrote;
validate's exit status and what it names."""
import json
import os

import pytest
import yaml

import rmt_peft.train.trainer as trainer
from rmt_peft.cli import main


def test_uncached_hub_model_offline_is_a_user_error_and_leaves_no_folder(write_recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe({"model": {"name_or_path": "rmt-peft-tests/not-a-cached-model"}})
    out = yaml.safe_load(open(path))["training"]["output_dir"]
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("rmt-peft train: error: "), err
    assert "model.name_or_path='rmt-peft-tests/not-a-cached-model' could not be loaded (offline" in err
    assert not os.path.exists(out)  # the same output_dir works for the next try
    assert main(["train", path]) == 2 and "already holds files" not in capsys.readouterr().err


def test_a_run_that_fails_after_training_began_keeps_its_folder(write_recipe, monkeypatch):
    def broken(recipe):  # the final evaluation's (the data check before training is datasets.py's own)
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(trainer, "final_segments", broken)  # after every stage has trained
    path = write_recipe({"curriculum.steps_per_stage": 1, "training.report_to": "tensorboard"})
    with pytest.raises(RuntimeError, match="evaluation broke"):
        main(["train", path])
    out = yaml.safe_load(open(path))["training"]["output_dir"]
    assert os.path.isdir(os.path.join(out, "logs")) and os.path.isdir(os.path.join(out, "stage-1", "end"))


def test_every_shipped_recipe_validates_offline_without_its_hub_tokenizer(capsys, monkeypatch):
    from rmt_peft import resources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in resources.names(resources.RECIPES):
        assert main(["validate", name]) == 0, capsys.readouterr().err
        out, err = capsys.readouterr()
        assert out.startswith(f"{name}: valid (") and out.count("\n") == 1  # one outcome, one line
        assert "the data fills every stage" in out or "note: the tokenizer could not be loaded" in err


def test_recipes_copies_a_deepspeed_config_with_how_to_use_it(tmp_path, capsys):
    target = tmp_path / "zero2.json"
    assert main(["recipes", "zero2", "--to", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"training.deepspeed={target}" in out and f"rmt-peft train {target}" not in out
    json.loads(target.read_text())


def test_the_result_table_is_stdout_and_the_trainer_logs_are_not(write_recipe, tmp_path, capsys):
    """stdout holds the result (also with -q); the Trainer's loss lines go to stderr, without
    progress bars when stderr is not a terminal (a log file gets no carriage returns)."""
    path = write_recipe({"training.disable_tqdm": False})
    assert main(["train", path]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["segments", "|", "accuracy", "(4", "memory)"] and len(out.splitlines()) == 3
    assert "stage 1 of 2 (stage-0): [1] segment(s)" in err and "step 1: loss " in err
    assert "\r" not in err and "\x1b[" not in err
    # summary.json says when, how long and with what software
    import datetime

    import torch

    summary = json.loads(open(os.path.join(yaml.safe_load(open(path))["training"]["output_dir"], "summary.json")).read())
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"] == "cpu"
    started, finished = (datetime.datetime.fromisoformat(summary[k]) for k in ("started", "finished"))
    assert 0 < summary["wall_seconds"] <= (finished - started).total_seconds() + 1
    path = write_recipe({"training.output_dir": str(tmp_path / "quiet")}, name="quiet.yaml")
    assert main(["train", path, "-q"]) == 0
    out, err = capsys.readouterr()
    assert "accuracy (4 memory)" in out and err == ""


def test_recipes_lists_whole_first_sentences_in_one_column(capsys, monkeypatch):
    from rmt_peft import resources

    monkeypatch.setenv("COLUMNS", "100")
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]
    names = resources.names(resources.RECIPES)
    starts = [line for line in lines if line.split()[0] in names]
    column = len(starts[0]) - len(starts[0][2:].split(None, 1)[1]) if starts else 0
    assert len(starts) == len(names)
    assert all(line[column - 1] == " " and line[column] != " " for line in lines), lines  # one column, wrapped
    text = " ".join(line[column:].strip() for line in lines)
    assert text.count(". ") + 1 == len(names) and text.endswith(".")  # each description one whole sentence


def test_recipe_yaml_records_a_local_model_by_its_absolute_path(write_recipe, tmp_path, monkeypatch):
    """So that eval / ask / export of the run work from any folder."""
    from rmt_peft.tiny_models import save_tiny_model

    monkeypatch.chdir(tmp_path)
    save_tiny_model("neo", "gpt_neo", vocab_size=64, max_positions=64)
    path = write_recipe({"model": {"name_or_path": "neo"}, "curriculum.segments": [1]})
    assert main(["train", path, "-q"]) == 0
    out = yaml.safe_load(open(path))["training"]["output_dir"]
    assert yaml.safe_load(open(os.path.join(out, "recipe.yaml")))["model"]["name_or_path"] == str(tmp_path / "neo")


def test_validate_command_exit_status(write_recipe, capsys):
    assert main(["validate", write_recipe()]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", write_recipe(), "memory.segment_size=0"]) != 0
    assert "segment_size" in capsys.readouterr().err


def test_validate_names_the_stage_a_data_source_cannot_fill(capsys):
    from rmt_peft.data.lean import EXAMPLE_LEMMAS, EXAMPLE_THEOREMS

    # The Lean recipe's generated data fills every stage (1..4 segments of 2028) and the eval lengths.
    lean = "lean_gptneo_1.3b"
    assert main(["validate", lean, "model.tokenizer=offline", "eval.num_segments=[1,4]"]) == 0
    assert "the data fills every stage" in capsys.readouterr().out
    # The 42 shipped example lemmas fill about one segment: the second stage is named, with the shortfall;
    # one outcome (no "valid" before the error), with the command's error prefix.
    assert main(["validate", lean, "model.tokenizer=offline", f"data.options.theorems={EXAMPLE_THEOREMS}",
                 f"data.options.lemmas={EXAMPLE_LEMMAS}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1].startswith("rmt-peft validate: error: invalid recipe lean_gptneo_1.3b: ")
    assert "curriculum stage 1 (2 segments)" in err and "short of the 2029 needed for 2 segments" in err


def test_validate_offline_hub_data_is_a_note_and_train_names_the_dataset(capsys, tmp_path):
    # QuALITY noise is a Hub dataset: offline it is not "a source too small" but one that cannot be read.
    args = ["babilong_memorize", "model.tokenizer=offline", "data.options.noise=quality"]
    assert main(["validate", *args]) == 0
    out, err = capsys.readouterr()
    assert "valid (" in out and "tasksource/QuALITY" in err and "not in the local cache" in err
    assert "cannot fill" not in err
