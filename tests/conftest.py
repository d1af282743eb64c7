"""Tiny models on a shared 2-core CPU: one intra-op thread per test. Matmuls of 64-wide layers
gain nothing from a second thread, and on a loaded machine OpenMP's spinning threads make them
10-100x slower."""
import contextlib
import copy
import functools
import glob
import os

import pytest
import torch
import yaml

@functools.cache
def cpu_rowwise_fp8() -> bool:
    """Whether torch's CPU ``_scaled_mm`` takes a scale per row (torch 2.11 takes one per tensor)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def pytest_runtest_setup(item):
    # The FP8 layer scales each row of its input; its tests run it on the CPU, where only newer
    # torch can (the layer itself runs on FP8 GPUs only: quantized_linear.check_fp8).
    if item.get_closest_marker("cpu_fp8") and not cpu_rowwise_fp8():
        pytest.skip(f"torch {torch.__version__}: the CPU's _scaled_mm takes no row-wise scales (torch 2.13's does)")


# DeepSpeed's CPU ranks (tests under `deepspeed --num_gpus 2`) leave shared-memory buffers of
# ~70 MB each in /dev/shm when they end: ~1 GB a test run, which fills a machine's RAM over a day.
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True, scope="session")
def remove_deepspeed_shm_buffers():
    before = set(glob.glob(SHM_BUFFERS))
    yield
    for path in set(glob.glob(SHM_BUFFERS)) - before:  # only this session's: the ranks have ended
        with contextlib.suppress(OSError):
            os.remove(path)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Nothing in the tests comes from the Hub. huggingface_hub reads HF_HUB_OFFLINE once, when
    imported, so a test's setenv does not reach it; and since huggingface_hub 2 a refused
    connection is retried with back-off (half a minute a call) before it fails. Offline, a missing
    model or tokenizer fails at once, as for a user who sets HF_HUB_OFFLINE."""
    from huggingface_hub import constants  # a submodule: not an attribute until imported

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_command_logging():
    """Each command runs in a process of its own in real use; a handler that an earlier test's
    command set up (rmt_peft.log.setup) must not print into the next test's captured stderr."""
    import logging

    yield
    package_logger = logging.getLogger("rmt_peft")
    for handler in [h for h in package_logger.handlers if getattr(h, "_rmt_peft", False)]:
        package_logger.removeHandler(handler)


# A tiny GPT-Neo on the token_memory task: the recipe of the training tests (write_recipe below);
# tests/reliability/conftest.py has its own, with three stages and checkpoints.
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


@pytest.fixture
def recipe_writer():
    """recipe_writer(base, folder, output_dir) -> write; see make_recipe_writer."""
    return make_recipe_writer


def make_recipe_writer(base: dict, folder, output_dir):
    """write(changes: dict of dotted keys, name) -> path of ``base`` with the changes, saved in
    ``folder``; ``output_dir(name)`` gives its training.output_dir."""
    def write(changes=None, name="recipe.yaml"):
        raw = copy.deepcopy(base)
        raw["training"]["output_dir"] = str(output_dir(name))
        for key, value in (changes or {}).items():
            node = raw
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        path = folder / name
        path.write_text(yaml.safe_dump(raw))
        return str(path)
    return write


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and what the uploaded folder held."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, self.token))

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        files = {n: open(os.path.join(folder_path, n), "rb").read() for n in os.listdir(folder_path)}
        self.calls.append(("upload_folder", repo_id, files, repo_type, commit_message))
        return "commit-info"


@pytest.fixture
def fake_hub(monkeypatch):
    """Uploads go to FakeHfApi; returns the list of its calls (push_to_hub, export --push-to-hub)."""
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls
