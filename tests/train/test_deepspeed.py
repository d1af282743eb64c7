"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (gloo) through the real launcher and
the module entry (``deepspeed --module rmt_peft.train``, from a folder outside the checkout), against
one process on the same data: a 1-segment stage, then 3-segment BPTT
with LoRA reused in every segment under non-reentrant checkpointing (whole segments with ZeRO-2,
per layer with ZeRO-3), must give the same loss curve and the same trained adapter. The same holds
for the associative memory, whose projections ZeRO-3 partitions and gathers inside the decoder
layers' hooks (without checkpointing under ZeRO-3: it takes neither kind). The backbone
loads from a folder, so under ZeRO-3 it is partitioned while loading (the memory's init std is
then computed on the gathered embedding) and the adapter must still be saved whole."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rmt_peft.tiny_models import save_tiny_model
from rmt_peft.recipe import load_recipe
from rmt_peft.runs import TRAINABLE_FILE
from rmt_peft.train.trainer import train_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
CHANGES = {
    "lora": {"r": 4, "target_modules": "attention"},
    "curriculum": {"stages": [{"num_segments": 1, "max_steps": 1}, {"num_segments": 3, "max_steps": STEPS}]},
    "eval.num_segments": [3],
    "eval.num_samples": 8,
    "training.learning_rate": 1.0e-2,
    "training.per_device_train_batch_size": 2,
    "training.per_device_eval_batch_size": 4,
    "training.save_strategy": "steps",
    "training.save_steps": STEPS,
}


def losses(output_dir):
    with open(os.path.join(output_dir, "stage-1", f"checkpoint-{STEPS}", "trainer_state.json")) as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "deepspeed")), reason="the deepspeed launcher is not installed")
@pytest.mark.parametrize("memory_kind", ["tokens", "associative"])
def test_zero2_and_zero3_on_two_cpu_ranks_match_one_process(write_recipe, tmp_path, memory_kind):
    backbone = save_tiny_model(str(tmp_path / "tiny-gpt-neo"), "gpt_neo", vocab_size=64, max_positions=64)
    changes = {**CHANGES, "model": {"name_or_path": backbone}}
    zero3_checkpointing = "training.gradient_checkpointing=true"
    if memory_kind == "associative":
        changes.update({"memory.memory_kind": "associative", "memory.associative_key_size": 4})
        # ZeRO-3 refuses whole-segment checkpointing and the associative memory per-layer checkpointing
        zero3_checkpointing = "memory.checkpoint_segments=false"
    path = write_recipe(changes)
    single = load_recipe(path, ["training.gradient_accumulation_steps=2"])
    single.training["output_dir"] = str(tmp_path / "single")
    summary = train_recipe(single, log=lambda *_: None)
    reference = losses(single.output_dir)
    assert len(reference) == STEPS and reference[0] != reference[-1]
    # the end of the last stage: the weights of final/, with parameter names
    trained = load_file(os.path.join(single.output_dir, "stage-1", "end", TRAINABLE_FILE))

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for config, checkpointing in (("zero2", "memory.checkpoint_segments=true"),
                                  ("zero3", zero3_checkpointing)):
        out = tmp_path / config
        # both launches at once: most of their time is start-up (imports), which overlaps well
        runs[config] = out, subprocess.Popen(
            [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "rmt_peft.train",
             path, f"training.deepspeed={config}", f"training.output_dir={out}", checkpointing],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for config, (out, process) in runs.items():
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output[-5000:]
        assert losses(out) == pytest.approx(reference, rel=1e-4), config
        adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
        assert adapter and all(t.numel() > 0 for t in adapter.values()), config
        saved = load_file(os.path.join(out, "stage-1", "end", TRAINABLE_FILE))
        assert saved.keys() == trained.keys()
        for name, tensor in trained.items():
            torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{config}: {name}")
        ds_summary = json.loads((out / "summary.json").read_text())
        assert ds_summary["eval"]["3"]["loss"] == pytest.approx(summary["eval"]["3"]["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "deepspeed")), reason="the deepspeed launcher is not installed")
def test_quickstart_with_baseline_and_compiled_blocks_under_the_launcher(tmp_path):
    """The quickstart recipe with eval.baseline trains the memory model and then the 0-memory
    baseline in one process: under DeepSpeed that is a second Trainer (it failed with "You cannot
    pass in a deepspeed_plugin when creating a second Accelerator"). Compiled blocks run under
    DeepSpeed too. Both evaluations must match one process without DeepSpeed or compiling."""
    from rmt_peft.train.trainer import run

    recipe = "quickstart"
    # no training noise on the memory: it draws from each rank's generator, so 2 ranks and one process
    # would train on different noise by design
    overrides = ["curriculum.steps_per_stage=2", "data.num_train_samples=128", "eval.num_samples=16",
                 "eval.num_segments=[1,3]", "training.per_device_eval_batch_size=16", "memory.memory_noise_std=0"]
    single = load_recipe(recipe, overrides + [f"training.output_dir={tmp_path / 'single'}",
                                              "training.per_device_train_batch_size=16",
                                              "training.gradient_accumulation_steps=2"])
    expected = run(single, log=lambda *_: None)

    out = tmp_path / "zero2"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "rmt_peft.train",
         recipe, *overrides, "training.per_device_train_batch_size=16", "training.deepspeed=zero2",
         f"training.output_dir={out}", "model.compile_blocks=true"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    for part in ("memory", "baseline"):
        got = summary["eval"] if part == "memory" else summary["baseline"]["eval"]
        want = expected["eval"] if part == "memory" else expected["baseline"]["eval"]
        assert got.keys() == want.keys() == {"1", "3"}
        for n in want:
            assert got[n]["loss"] == pytest.approx(want[n]["loss"], rel=1e-4), (part, n)
