"""Recipes: loading, overrides with YAML types, and validation messages that name key, value and
what is allowed. Nothing here loads model weights."""

import pytest
import torch
import yaml

from rmt_peft import resources
from rmt_peft.recipe import RecipeError, load_recipe


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_overrides_are_parsed_as_yaml_and_reach_every_section(write_recipe):
    recipe = load_recipe(write_recipe(), ["training.learning_rate=1e-4", "memory.num_memory_tokens=2",
                                          "curriculum.segments=[1,2,4]", "lora.r=4", "eval.baseline=true"])
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert recipe.memory.num_memory_tokens == 2
    assert [s.num_segments for s in recipe.curriculum.stages] == [1, 2, 4]
    assert all(s.max_steps == 4 for s in recipe.curriculum.stages)
    assert recipe.lora == {"r": 4} and recipe.eval.baseline is True


def test_recipes_take_the_new_quantizations_and_auto_checkpointing(write_recipe, tmp_path):
    from rmt_peft.tiny_models import save_tiny_model

    # a saved model (a tiny: one is built, not loaded, so it takes no quantization) with LoRA (a
    # quantized backbone does not train whole)
    folder = save_tiny_model(str(tmp_path / "tiny"), "gpt_neo", vocab_size=64, max_positions=64)
    recipe = load_recipe(write_recipe({"model": {"name_or_path": folder}}),
                         ["model.quantization=fp8", "model.quantization_backend=torch", "lora=attention",
                          "memory.checkpoint_segments=auto"])
    assert (recipe.model.quantization, recipe.model.quantization_backend) == ("fp8", "torch")
    assert recipe.memory.checkpoint_segments == "auto"


def test_mixed_stages_and_the_resolved_recipe_round_trips(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"curriculum.mix_previous": True, "curriculum.segments": [1, 2, 3]}))
    assert [s.num_segments for s in recipe.curriculum.stages] == [1, [1, 2], [1, 2, 3]]
    again = tmp_path / "resolved.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(str(again)).to_dict() == recipe.to_dict()


@pytest.mark.parametrize("override, expected", [
    ("memory.num_memory_token=3", ["memory.num_memory_token", "allowed", "num_memory_tokens"]),
    ("memory.segment_size=eight", ["memory.segment_size='eight'", "an integer"]),
    ("memory.segment_alignment=middle", ["segment_alignment='middle'", "left", "right"]),
    ("training.learning_rat=0.1", ["training.learning_rat", "TrainingArguments"]),
    ("training.max_steps=many", ["training.max_steps='many'", "an integer"]),
    ("training.eval_strategy=sometimes", ["training.eval_strategy='sometimes'", "steps", "epoch"]),
    ("model.quantization=3bit", ["model.quantization='3bit'", "8bit", "4bit", "fp8"]),
    ("model.quantization_backend=cuda", ["model.quantization_backend='cuda'", "auto", "bitsandbytes", "torch"]),
    (["model.quantization=fp8", "model.quantization_backend=bitsandbytes"],
     ["model.quantization='fp8'", "['auto', 'torch']"]),
    (["model.quantization=4bit", "model.quantization_backend=torch", "model.cache_dequantized_weights=true"],
     ["cache_dequantized_weights=true", "quantization_backend='torch'"]),
    (["model.quantization=fp8", "training.deepspeed=zero2"], ["model.quantization='fp8'", "training.deepspeed"]),
    ("memory.checkpoint_segments=sometimes", ["checkpoint_segments='sometimes'", "'auto'"]),
    ("model.compile_mode=fastest", ["model.compile_mode='fastest'", "reduce-overhead"]),
    ("model.compile_scope=model", ["model.compile_scope='model'", "'blocks'", "'body'"]),
    (["model.compile_blocks=false", "model.compile_scope=body"], ["model.compile_scope='body'", "compile_blocks=true"]),
    ("model.compile_memory_budget=0", ["model.compile_memory_budget=0", "(0, 1]"]),
    ("model.compile_memory_budget=half", ["model.compile_memory_budget='half'", "float | None"]),
    (["model.compile_blocks=false", "model.compile_memory_budget=0.5"],
     ["model.compile_memory_budget=0.5", "compile_blocks=true"]),
    (["model.compile_blocks=false", "model.compile_mode=reduce-overhead"],
     ["model.compile_mode='reduce-overhead'", "compile_blocks=true"]),
    (["model.compile_blocks=true", "model.compile_mode=reduce-overhead", "memory.checkpoint_segments=true"],
     ["compile_mode='reduce-overhead'", "CUDA graphs", "checkpoint_segments"]),
    ("model.cache_dequantized_weights=true", ["cache_dequantized_weights=true", "'4bit'", "None"]),
    (["model.quantization=4bit", "model.dtype=bfloat16", "model.cache_dequantized_weights=true",
      "training.deepspeed=zero3"], ["cache_dequantized_weights=true", "ZeRO-3", "ZeRO-2"]),
    (["model.compile_scope=body", "model.compile_memory_budget=0.5", "training.deepspeed=zero3"],
     ["model.compile_scope='body' and model.compile_memory_budget=0.5", "ZeRO-3", "no effect", "ZeRO-2"]),
    ("data.task=poetry", ["data.task='poetry'", "token_memory"]),
    ("data.options.colour=red", ["colour", "num_values"]),
    ("memory.segment_size=60", ["segment_size=60", "68 positions", "64", "segment_size <= 56"]),
    ("model.config.vocab_size=many", ["model.config"]),
    ("curriculum.stages=[{num_segments: 2, metric: eval_accuracy}]", ["segments", "stages", "not both"]),
    ("training.gradient_checkpointing_kwargs={use_reentrant: true}", ["use_reentrant", "false"]),
    ("optimizer.lr=1", ["unknown section", "optimizer", "training"]),
    ("memory.memory_kind=matrix", ["memory_kind='matrix'", "tokens", "associative"]),
    (["memory.memory_kind=associative", "training.gradient_checkpointing=true"],
     ["gradient_checkpointing=true", "memory_kind='associative'", "memory.checkpoint_segments=true"]),
    (["memory.memory_kind=associative", "memory.memory_update=gated"],
     ["memory_update='gated'", "memory of tokens", "memory_kind='associative'"]),
    (["memory.memory_kind=associative", "memory.segment_size=61"], ["65 positions", "segment + memory", "<= 60"]),
    ("training.remove_unused_columns=true", ["remove_unused_columns", "cannot be set"]),
])
def test_bad_values_are_rejected_with_key_value_and_allowed(write_recipe, override, expected):
    message = error_of(write_recipe(), [override] if isinstance(override, str) else override)
    for part in expected:
        assert part in message, (part, message)


def test_a_metric_needs_a_threshold_or_patience_and_evaluations(write_recipe):
    stages = ["curriculum.segments=[]", "curriculum.stages=[{num_segments: 2, metric: eval_accuracy}]"]
    assert "threshold or patience" in error_of(write_recipe(), stages)
    message = error_of(write_recipe(), stages + ["curriculum.threshold=0.9"])
    assert "eval_strategy" in message
    recipe = load_recipe(write_recipe(), stages + ["curriculum.threshold=0.9", "training.eval_strategy=steps"])
    assert recipe.curriculum.stages[0].threshold == 0.9


def test_compiled_blocks_resolve_off_under_zero3_and_are_refused_when_asked_for(write_recipe, monkeypatch):
    """ZeRO-3's per-module hooks make torch.compile recompile until its limit (2 x H200: no step in
    200 s): null resolves to off there (build_model says so: tests/train/test_build.py); true (or a
    compile_mode) fails."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resolved = {ds: load_recipe(write_recipe(), [f"training.deepspeed={ds}"] if ds else []).compiles_blocks
                for ds in (None, "zero2", "zero3", "zero3_offload")}
    assert resolved == {None: True, "zero2": True, "zero3": False, "zero3_offload": False}
    assert load_recipe(write_recipe(), ["training.deepspeed=zero2", "model.compile_blocks=true"]).compiles_blocks
    assert not load_recipe(write_recipe(), ["training.deepspeed=zero3", "model.compile_blocks=false"]).compiles_blocks
    for asked, key in ((["model.compile_blocks=true"], "model.compile_blocks=true"),
                       (["model.compile_mode=default"], "model.compile_mode='default'")):
        for config in ("zero3", "zero3_offload"):
            message = error_of(write_recipe(), [f"training.deepspeed={config}", *asked])
            for part in (key, "ZeRO-3", "training.deepspeed=", config, "recompile", "compile_blocks=null", "zero2"):
                assert part in message, (part, message)


def test_zero3_with_8bit_and_unknown_deepspeed_config(write_recipe):
    message = error_of(write_recipe(), ["training.deepspeed=zero3", "model.quantization=8bit"])
    assert "8bit" in message and "ZeRO-3" in message and "ZeRO-2" in message
    message = error_of(write_recipe(), ["training.deepspeed=zero9"])
    assert "zero9" in message and "zero2" in message and "zero3_offload" in message
    recipe = load_recipe(write_recipe(), ["training.deepspeed=zero3"])
    assert recipe.zero_stage == 3
    assert recipe.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_folder_named_like_a_shipped_deepspeed_config_does_not_hide_it(write_recipe, tmp_path, monkeypatch):
    """A run's output_dir "zero3" in the working directory (two launches side by side) is a
    folder, not a config file: the name still means the shipped config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3").mkdir()
    assert load_recipe(write_recipe(), ["training.deepspeed=zero3"]).zero_stage == 3


def test_missing_or_broken_files_and_model_paths(write_recipe, tmp_path):
    assert "does not exist" in error_of(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert "not valid YAML" in error_of(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- just\n- a list\n")
    assert "must hold a mapping" in error_of(str(listing))
    message = error_of(write_recipe(), [f"model.name_or_path={tmp_path}/no-such-model", "model.config={}"])
    assert "no-such-model" in message and "does not exist" in message


def test_a_local_model_folder_is_checked_from_its_config_only(write_recipe, tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-tiny"
    GPT2Config(n_positions=32, n_embd=64, n_layer=1, n_head=2, vocab_size=64).save_pretrained(folder)
    base = [f"model.name_or_path={folder}", "model.config={}"]
    assert load_recipe(write_recipe(), base + ["memory.segment_size=24"]).model.name_or_path == str(folder)
    message = error_of(write_recipe(), base + ["memory.segment_size=28"])
    assert "needs 36 positions" in message and "has 32" in message


@pytest.mark.parametrize("name", resources.names(resources.RECIPES))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.curriculum.stages and recipe.output_dir
    assert yaml.safe_load(recipe.to_yaml())["model"]["name_or_path"] == recipe.model.name_or_path


