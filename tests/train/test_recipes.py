"""Every shipped paper recipe runs end to end for a few steps with its backbone swapped for a
tiny local model of the same architecture (with the offline tokenizer) and its data for the
offline generators; everything else (LoRA preset, memory, curriculum, quantization, checkpointing,
evaluation) is the recipe's own."""
import json

import pytest

from rmt_peft.data.tokenizer import save_offline_tokenizer
from rmt_peft.tiny_models import save_tiny_model
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import run

# recipe -> (tiny architecture standing in for its model, the data option that names a Hub source)
RECIPES = {
    "babilong_memorize": ("gpt2", "data.options.noise=generated"),
    "babilong_detect": ("gpt2", "data.options.noise=generated"),
    "babilong_reasoning": ("gpt2", "data.options.noise=generated"),
    "arxiv_gpt2": ("gpt2", "data.options.documents=generated"),
    "arxiv_gpt2_baseline": ("gpt2", "data.options.documents=generated"),
    # one window of 32 history tokens + a 64-token target, evaluated at that one length
    "arxiv_gpt2_context": ("gpt2", "data.options.documents=generated", "data.options.history_tokens=32",
                           "eval.num_segments=[1]"),
    "babilong_detect_opt_1.3b": ("opt", "data.options.noise=generated"),
    "babilong_reasoning_opt_6.7b_8bit": ("opt", "data.options.noise=generated"),  # 8-bit on CPU, as in the recipe
    # one step a stage, so the run reaches the last stage: 1..32 segments, the levers on, checkpointed
    "babilong_reasoning_32": ("gpt2", "data.options.noise=generated", "curriculum.steps_per_stage=1",
                              "training.max_steps=9"),
    "lean_gptneo_1.3b": ("gpt_neo", None),
    "lean_gptneo_1.3b_baseline": ("gpt_neo", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipe_runs_a_few_steps_offline(name, tmp_path):
    arch, offline_data, *extra = RECIPES[name]
    backbone = save_tiny_model(str(tmp_path / f"tiny-{arch}"), arch, vocab_size=640, max_positions=256)
    save_offline_tokenizer(backbone)
    out = tmp_path / "run"
    overrides = [f"model.name_or_path={backbone}", "model.dtype=float32", "memory.segment_size=96",
                 "data.num_train_samples=4", "data.num_eval_samples=2", "eval.num_samples=2",
                 "eval.num_segments=[1,2]", "training.max_steps=3", "training.per_device_train_batch_size=2",
                 "training.gradient_accumulation_steps=1", "training.eval_steps=2", "training.save_steps=2",
                 "training.bf16=false", "training.deepspeed=null", "training.report_to=none",
                 "training.disable_tqdm=true", f"training.output_dir={out}"]
    if offline_data:
        overrides.append(offline_data)
    recipe = load_recipe(name, overrides + extra)
    run(recipe, log=lambda *_: None)

    summary = json.loads((out / "summary.json").read_text())
    # training.max_steps caps the curriculum
    assert sum(stage["steps"] for stage in summary["stages"]) == recipe.training["max_steps"]
    assert set(summary["eval"]) == {str(n) for n in recipe.eval.num_segments}
    assert all(0 < m["loss"] < 20 for m in summary["eval"].values())
    final = out / "final"
    assert (final / "memory_config.json").exists() and (final / "adapter_config.json").exists()
    memory = json.loads((final / "memory_config.json").read_text())
    assert memory["num_memory_tokens"] == recipe.memory.num_memory_tokens
    # the backbone really was loaded as the recipe says (8-bit / 4-bit recipes stay quantized here)
    from rmt_peft.saving import read_metadata

    assert read_metadata(str(final))["quantization"] == (recipe.model.quantization or "none")
