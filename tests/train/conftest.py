"""Small recipes for the training tests: a tiny GPT-Neo on the token_memory task."""

import pytest

TINY = {
    "model": {"name_or_path": "tiny:gpt_neo", "config": {"vocab_size": 64, "max_positions": 64}},
    "memory": {"num_memory_tokens": 4, "segment_size": 8},
    "lora": None,
    "data": {"task": "token_memory", "options": {"vocab_size": 64}, "num_train_samples": 64,
             "num_eval_samples": 16},
    "curriculum": {"segments": [1, 2], "steps_per_stage": 4},
    "eval": {"num_segments": [2], "num_samples": 16},
    "training": {"output_dir": "OUT", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                 "learning_rate": 2.0e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                 "seed": 0, "disable_tqdm": True},
}


@pytest.fixture
def write_recipe(tmp_path, recipe_writer):
    """write_recipe(changes: dict of dotted keys) -> path of a tiny recipe with output in tmp_path/run."""
    return recipe_writer(TINY, tmp_path, lambda name: tmp_path / "run")
