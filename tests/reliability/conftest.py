"""A tiny three-stage recipe (GPT-Neo from a config, token_memory task) for the reliability tests:
every run takes a few seconds on one CPU thread."""
import os

import pytest
from safetensors.torch import load_file

TINY = {
    "model": {"name_or_path": "tiny:gpt_neo", "config": {"vocab_size": 64, "max_positions": 64}},
    "memory": {"num_memory_tokens": 4, "segment_size": 8},
    "lora": None,
    "data": {"task": "token_memory", "options": {"vocab_size": 64}, "num_train_samples": 64,
             "num_eval_samples": 16},
    "curriculum": {"segments": [1, 2, 3], "steps_per_stage": 4},
    "eval": {"num_segments": [3], "num_samples": 16},
    "training": {"output_dir": "OUT", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                 "learning_rate": 1.0e-2, "lr_scheduler_type": "linear", "logging_steps": 1,
                 "save_strategy": "steps", "save_steps": 2, "report_to": "none", "seed": 0, "disable_tqdm": True},
}


@pytest.fixture
def write_recipe(tmp_path, recipe_writer):
    """write_recipe(changes: dict of dotted keys, name) -> path of a tiny recipe writing to tmp_path/<name stem>."""
    return recipe_writer(TINY, tmp_path, lambda name: tmp_path / name.split(".")[0])


@pytest.fixture
def final_weights():
    """final_weights(output_dir) -> every tensor a user loads from final/ (model or adapter weights and
    the memory), keyed by file and name."""
    def read(output_dir):
        final = os.path.join(output_dir, "final")
        return {f"{name}:{key}": tensor for name in sorted(os.listdir(final)) if name.endswith(".safetensors")
                for key, tensor in load_file(os.path.join(final, name)).items()}
    return read


@pytest.fixture(scope="session")
def tiny_recipe():
    """TINY, for modules that cannot import this conftest."""
    return TINY


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny finished run shared by the tests that only read it (or refuse to write into it):
    a checkpoint, TensorBoard logs and final/; its model.tokenizer is the offline one (vocabulary
    640 fits it), so `ask` can read text with it. Tests must not change it."""
    import yaml

    from rmt_peft.recipe import load_recipe
    from rmt_peft.train.trainer import run

    folder = tmp_path_factory.mktemp("shared")
    raw = {**TINY, "model": {"name_or_path": "tiny:gpt_neo", "config": {"vocab_size": 640, "max_positions": 64},
                             "tokenizer": "offline"},  # ask reads text with it
           "data": {**TINY["data"], "num_train_samples": 8, "num_eval_samples": 4},
           "curriculum": {"segments": [1], "steps_per_stage": 2},
           "eval": {"num_segments": [1], "num_samples": 4},
           "training": {**TINY["training"], "output_dir": str(folder / "run"), "save_steps": 1,
                        "report_to": "tensorboard"}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run(load_recipe(str(folder / "recipe.yaml")), log=lambda *_: None)
    return folder / "run"
