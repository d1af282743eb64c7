"""Recipes: loading, overrides with YAML types, and validation messages that name key, value and
what is allowed. Nothing here loads model weights."""
import os

import pytest
import torch
import yaml

from rmt_peft import resources
from rmt_peft.cli import main
from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.runs import check_start


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
    (["model.compile_blocks=false", "model.compile_mode=reduce-overhead"],
     ["model.compile_mode='reduce-overhead'", "compile_blocks=true"]),
    (["model.compile_blocks=true", "model.compile_mode=reduce-overhead", "memory.checkpoint_segments=true"],
     ["compile_mode='reduce-overhead'", "CUDA graphs", "checkpoint_segments"]),
    ("model.cache_dequantized_weights=true", ["cache_dequantized_weights=true", "'4bit'", "None"]),
    (["model.quantization=4bit", "model.dtype=bfloat16", "model.cache_dequantized_weights=true",
      "training.deepspeed=zero3"], ["cache_dequantized_weights=true", "ZeRO-3", "ZeRO-2"]),
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
    (["memory.memory_kind=associative", "memory.memory_noise_std=0.1"],
     ["memory_noise_std=0.1", "memory of tokens", "memory_kind='associative'"]),
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


def test_output_dir_holding_another_run_is_never_overwritten(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    os.makedirs(recipe.output_dir)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(RecipeError, match="already holds files"):
        check_start(recipe.output_dir, resume=False)
    with pytest.raises(RecipeError, match="no run to resume"):
        check_start(recipe.output_dir, resume=True)


def test_validate_command_exit_status(write_recipe, capsys):
    assert main(["validate", write_recipe()]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", write_recipe(), "memory.segment_size=0"]) != 0
    assert "segment_size" in capsys.readouterr().err


@pytest.mark.parametrize("name", resources.names(resources.RECIPES))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.curriculum.stages and recipe.output_dir
    assert yaml.safe_load(recipe.to_yaml())["model"]["name_or_path"] == recipe.model.name_or_path


def test_speedups_are_applied_and_can_be_turned_off(write_recipe):
    """model.speedups (default true): fused GELU and GPT-Neo's SDPA attention, with the same loss as
    the model without them; model.attention=eager keeps eager attention."""
    from transformers.activations import NewGELUActivation

    from rmt_peft.attention import GPTNeoSdpaSelfAttention
    from rmt_peft.speedups import FusedTanhGelu
    from rmt_peft.train.build import build_model

    def kinds(model):
        return [sum(type(m) is kind for m in model.modules())
                for kind in (FusedTanhGelu, NewGELUActivation, GPTNeoSdpaSelfAttention)]

    on, off = (build_model(load_recipe(write_recipe(changes)), seed=0) for changes in ({}, {"model.speedups": False}))
    assert kinds(on) == [2, 0, 2] and on.pad_lm_head  # two tiny GPT-Neo layers
    assert kinds(off) == [0, 2, 0] and not off.pad_lm_head
    eager = build_model(load_recipe(write_recipe({"model.attention": "eager"})), seed=0)
    assert kinds(eager) == [2, 0, 0]
    ids = torch.randint(0, 64, (2, 24))
    torch.testing.assert_close(on(ids, labels=ids).loss, off(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


def test_compile_mode_reaches_compile_blocks(write_recipe, monkeypatch):
    import rmt_peft.speedups
    from rmt_peft.train.build import build_model

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(kwargs))
    build_model(load_recipe(write_recipe({"model.compile_blocks": True})), seed=0)
    build_model(load_recipe(write_recipe({"model.compile_blocks": True, "model.compile_mode": "reduce-overhead"})),
                seed=0)
    build_model(load_recipe(write_recipe()), seed=0)  # compile_blocks: null, and no GPU here
    assert calls == [{}, {"mode": "reduce-overhead"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # null means: on where a GPU is
    build_model(load_recipe(write_recipe()), seed=0)
    build_model(load_recipe(write_recipe({"model.compile_blocks": False})), seed=0)
    assert calls == [{}, {"mode": "reduce-overhead"}, {}]


def test_compiled_blocks_are_off_by_default_under_zero3_and_refused_when_asked_for(write_recipe, monkeypatch,
                                                                                   caplog):
    """ZeRO-3's per-module hooks make torch.compile recompile until its limit (2 x H200: no step in
    200 s): null resolves to off there, with one log line saying why; true (or a compile_mode) fails."""
    import rmt_peft.speedups
    from rmt_peft.train.build import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resolved = {ds: load_recipe(write_recipe(), [f"training.deepspeed={ds}"] if ds else []).compiles_blocks
                for ds in (None, "zero2", "zero3", "zero3_offload")}
    assert resolved == {None: True, "zero2": True, "zero3": False, "zero3_offload": False}
    assert load_recipe(write_recipe(), ["training.deepspeed=zero2", "model.compile_blocks=true"]).compiles_blocks
    assert not load_recipe(write_recipe(), ["training.deepspeed=zero3", "model.compile_blocks=false"]).compiles_blocks

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(kwargs))
    with caplog.at_level("INFO", logger="rmt_peft"):
        build_model(load_recipe(write_recipe(), ["training.deepspeed=zero3"]), seed=0)
    assert calls == []
    said = [r.getMessage() for r in caplog.records if "compile_blocks" in r.getMessage()]
    assert len(said) == 1 and "off under ZeRO-3" in said[0] and "recompile" in said[0], said

    for asked, key in ((["model.compile_blocks=true"], "model.compile_blocks=true"),
                       (["model.compile_mode=default"], "model.compile_mode='default'")):
        for config in ("zero3", "zero3_offload"):
            message = error_of(write_recipe(), [f"training.deepspeed={config}", *asked])
            for part in (key, "ZeRO-3", "training.deepspeed=", config, "recompile", "compile_blocks=null", "zero2"):
                assert part in message, (part, message)


def test_a_half_precision_backbone_under_zero3_without_training_bf16_is_warned_about(write_recipe, caplog):
    """ZeRO-3 partitions in the DeepSpeed config's dtype: fp32 unless training.bf16 (or fp16) is set."""
    from rmt_peft.train.build import build_model

    def warnings_of(overrides):
        caplog.clear()
        with caplog.at_level("WARNING", logger="rmt_peft"):
            build_model(load_recipe(write_recipe(), overrides), seed=0)
        return [r.getMessage() for r in caplog.records if "training.bf16" in r.getMessage()]

    said = warnings_of(["training.deepspeed=zero3", "model.dtype=bfloat16"])
    assert len(said) == 1 and "model.dtype=bfloat16 under ZeRO-3" in said[0] and "fp32" in said[0], said
    assert warnings_of(["training.deepspeed=zero2", "model.dtype=bfloat16"]) == []
    assert warnings_of(["training.deepspeed=zero3", "model.dtype=float32"]) == []


def test_dequantized_weight_cache_reaches_the_4bit_backbone(write_recipe, tmp_path):
    from rmt_peft.tiny_models import save_tiny_model
    from rmt_peft.train.build import build_model

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", vocab_size=64, max_positions=64)
    changes = {"model": {"name_or_path": path, "quantization": "4bit", "cache_dequantized_weights": True},
               "lora": "attention"}  # a quantized backbone does not train: lora null is refused
    model = build_model(load_recipe(write_recipe(changes)), seed=0)
    assert sum(hasattr(m, "dequantized_weight") for m in model.modules()) == 12  # 6 linear layers x 2 blocks


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
