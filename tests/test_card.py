"""A trained run's model card, written through huggingface_hub.ModelCard: valid Hub metadata (no
base_model for a model built from a config), evaluation results from summary.json as model-index,
the recipe's hyper-parameters, usage code; final/ and an export hold only what a user needs."""
import json
import os

from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from rmt_peft import card
from rmt_peft.cli import main
from rmt_peft.recipe import load_recipe
from rmt_peft.runs import TRAINABLE_FILE
from rmt_peft.train.trainer import run


def test_run_card_holds_results_and_hyperparameters_and_exports_only_what_users_need(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"eval.num_segments": [1, 2, 10], "curriculum.steps_per_stage": 2,
                                       "data.options": {"vocab_size": 64}}))
    run(recipe, log=lambda *_: None)
    out, final = recipe.output_dir, os.path.join(recipe.output_dir, "final")
    assert TRAINABLE_FILE not in os.listdir(final)  # resume state lives in stage-*/end and checkpoints
    assert TRAINABLE_FILE in os.listdir(os.path.join(out, "stage-1", "end"))
    summary = json.load(open(os.path.join(out, "summary.json")))

    card = ModelCard.load(os.path.join(final, "README.md"), ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert "base_model" not in data  # tiny:gpt_neo is built from a config: no Hub model to link
    assert card.data.model_name == "run" and "\n# run\n" in card.content  # the run's name, not "final"
    _, results = model_index_to_eval_results(data["model-index"])  # what the Hub's parser reads back
    accuracy = {r.dataset_config: r.metric_value for r in results if r.metric_type == "accuracy"}
    assert accuracy == {n: round(summary["eval"][n]["accuracy"], 4) for n in ("1", "2", "10")}
    assert list(accuracy) == ["1", "2", "10"]  # by number, not as strings ("1", "10", "2")
    # weights built from a config: rmt-peft's license, said in the text; no developer notes, no dead links
    assert card.data.license == "apache-2.0" and "License: `apache-2.0`" in card.text
    assert "pypi.org" not in card.text and "so the card names no" not in card.text
    assert all(r.dataset_type == "token_memory" and r.task_type == "text-generation" for r in results)
    assert "| learning_rate | `0.002` |" in card.text and "RMTModel.from_pretrained(" in card.text
    assert f"| 2 | {summary['eval']['2']['accuracy']:.4f} |" in card.text

    assert main(["export", out, "--to", str(tmp_path / "shipped")]) == 0
    shipped = set(os.listdir(tmp_path / "shipped"))
    assert TRAINABLE_FILE not in shipped and shipped == set(os.listdir(final))
    exported = ModelCard.load(str(tmp_path / "shipped" / "README.md"))
    assert exported.data.eval_results and exported.data.model_name == "shipped"
    assert 'RMTModel.from_pretrained("path/to/shipped")' in exported.text  # not a made-up Hub id


def test_card_license_is_the_base_models_where_its_card_is_at_hand(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    assert card.base_license(str(tmp_path / "base")) == "mit"
    assert card.base_license(str(tmp_path)) is None  # no card
    assert card.base_license("rmt-peft-tests/not-cached") is None  # never downloaded


def test_model_index_takes_the_finite_results_in_the_order_of_the_lengths():
    summary = {"eval": {"10": {"accuracy": 0.5, "perplexity": 3.0}, "2": {"accuracy": 1.0, "perplexity": float("nan")},
                        "all": {"accuracy": None, "perplexity": 7.123456}}}
    results = card.eval_results("run", "token_memory", [], summary)
    assert [(r.dataset_config, r.metric_type, r.metric_value, r.dataset_name) for r in results] == [
        ("2", "accuracy", 1.0, "token_memory (2 segment(s))"),
        ("10", "accuracy", 0.5, "token_memory (10 segment(s))"), ("10", "perplexity", 3.0, "token_memory (10 segment(s))"),
        ("all", "perplexity", 7.1235, "token_memory (held-out split)")]
    assert {r.dataset_type for r in card.eval_results("run", "babilong_memorize", ["tasksource/QuALITY"], summary)} == {
        "tasksource/QuALITY"}
    assert card.eval_results("run", "token_memory", [], {}) is None


def test_the_results_table_has_a_baseline_column_when_there_is_one():
    assert card._results_table({}).startswith("No evaluation was recorded with this model (`summary.json`")
    row = {"accuracy": 0.5, "loss": 0.25, "perplexity": 1.284}
    summary = {"eval": {"10": row, "2": row}, "baseline": {"eval": {"2": {"accuracy": 0.125}}}}
    assert card._results_table(summary) == (
        "| segments | accuracy | loss | perplexity | accuracy without memory |\n"
        "|---|---|---|---|---|\n"
        "| 2 | 0.5000 | 0.2500 | 1.284 | 0.1250 |\n"
        "| 10 | 0.5000 | 0.2500 | 1.284 | |\n")


def test_the_license_is_the_bases_rmt_peft_s_for_a_config_built_model_else_other(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n")
    assert card.license_of(str(tmp_path / "base")) == ("mit", f"License: `mit`, the license of the base model "
                                                               f"`{tmp_path / 'base'}`.")
    assert card.license_of("tiny:gpt_neo")[0] == "apache-2.0"
    license, line = card.license_of("someone/uncached-model")
    assert license == "other" and "base model `someone/uncached-model` applies" in line and "set it" in line
