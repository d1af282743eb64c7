"""A trained run's model card, written through huggingface_hub.ModelCard: valid Hub metadata (no
base_model for a model built from a config), evaluation results from summary.json as model-index,
the recipe's hyper-parameters, usage code; final/ and an export hold only what a user needs."""
import json
import os

from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from rmt_peft import card, hub
from rmt_peft.data.registry import hub_datasets
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


def test_card_base_model_is_a_hub_repo_id_or_left_out(tmp_path):
    assert hub.hub_repo_id("EleutherAI/gpt-neo-125m") == "EleutherAI/gpt-neo-125m"
    assert hub.hub_repo_id("gpt2") == "gpt2"
    for local in ("tiny:gpt_neo", str(tmp_path), "./models/neo", "~/neo"):
        assert hub.hub_repo_id(local) is None, local
    assert hub_datasets({"noise": "quality"}) == ["tasksource/QuALITY"]
    assert hub_datasets({"path": "json", "data_files": "qa.jsonl"}) == []


def test_merge_export_of_a_run_on_a_model_built_from_a_config(write_recipe, tmp_path, capsys):
    import warnings

    import torch

    from rmt_peft import RMTModel
    from rmt_peft.tiny_models import save_tiny_model

    recipe = load_recipe(write_recipe({"lora": "attention", "curriculum.segments": [1], "curriculum.steps_per_stage": 2,
                                       "eval.num_segments": [1], "training.learning_rate": 0.05}))
    run(recipe, log=lambda *_: None)
    merged = tmp_path / "merged"
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", recipe.output_dir, "--to", str(merged), "--merge", "--dtype", "float32"]) == 0
    # one line; no peft warnings about the rebuilt base or a temporary folder
    assert not [str(w.message) for w in caught if "peft" in w.filename or "checkpointing" in str(w.message)]
    out, err = capsys.readouterr()
    assert out == f"wrote merged model (full weights + memory) to {merged}\n" and "tmp" not in err, err
    # the reference: the adapter on the frozen tiny backbone rebuilt independently (training seed 0)
    base = save_tiny_model(str(tmp_path / "base"), "gpt_neo", seed=0, vocab_size=64, max_positions=64)
    trained = RMTModel.from_pretrained(os.path.join(recipe.output_dir, "final"), base_model=base)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids, return_logits=True).logits
        got = RMTModel.from_pretrained(str(merged))(input_ids=ids, return_logits=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    card = ModelCard.load(str(merged / "README.md"))
    assert "base_model" not in card.data.to_dict()
    assert "AutoModelForCausalLM.from_pretrained(path)` loads these weights alone: it ignores the memory" in card.text


def test_card_license_is_the_base_models_where_its_card_is_at_hand(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    assert card.base_license(str(tmp_path / "base")) == "mit"
    assert card.base_license(str(tmp_path)) is None  # no card
    assert card.base_license("rmt-peft-tests/not-cached") is None  # never downloaded
