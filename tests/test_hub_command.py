"""``rmt-peft export`` (rmt_peft/hub_command.py): an adapter copied with a fresh card and the files a
user needs, merged into full weights (also onto a base built from a config), pushed to the Hub;
bad sources are one line. What export may overwrite is tests/reliability/test_export.py's."""
import os
import shutil
import sys
import warnings

import pytest
import torch
from huggingface_hub import ModelCard

from rmt_peft import MemoryConfig, RMTModel, load_backbone
from rmt_peft.cli import main as cli_main
from rmt_peft.hub_command import exported_files, extra_files
from rmt_peft.recipe import load_recipe
from rmt_peft.tiny_models import save_tiny_model
from rmt_peft.train.trainer import run

IDS = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
OUR_FILES = {"memory_config.json", "memory.safetensors", "README.md"}


def logits(rmt):
    with torch.no_grad():
        return rmt(IDS).logits.float()


@pytest.fixture(scope="module")
def neo_adapter(tmp_path_factory):
    """A tiny GPT-Neo with random-initialised LoRA (so merging has a visible effect), saved."""
    root = tmp_path_factory.mktemp("export")
    backbone = load_backbone(save_tiny_model(str(root / "base"), "gpt_neo"), dtype="float32")
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=4, segment_size=8), verbose=False,
                                 lora={"target_modules": "all-linear", "init_lora_weights": False, "r": 4,
                                       "lora_alpha": 4}).eval()
    return rmt, rmt.save_pretrained(str(root / "neo"))


def test_only_what_a_user_needs_is_exported_and_a_merge_keeps_the_extra_files(tmp_path):
    names = ["README.md", "adapter_config.json", "adapter_model.safetensors", "memory.safetensors",
             "memory_config.json", "tokenizer.json", "special_tokens_map.json", "model.safetensors",
             "trainable.safetensors", "curriculum.json", "trainer_state.json", "optimizer.pt", "scheduler.pt",
             "training_args.bin", "rng_state.pth", "rng_state_1.pth"]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / "runs").mkdir()  # folders are not exported
    resume = {"trainable.safetensors", "curriculum.json", "trainer_state.json", "optimizer.pt", "scheduler.pt",
              "training_args.bin", "rng_state.pth", "rng_state_1.pth"}
    assert exported_files(str(tmp_path)) == sorted(set(names) - resume)
    assert extra_files(str(tmp_path)) == [str(tmp_path / "special_tokens_map.json"), str(tmp_path / "tokenizer.json")]


def test_export_command(neo_adapter, tmp_path, fake_hub, monkeypatch, capsys):
    rmt, folder = neo_adapter
    run = tmp_path / "run"
    shutil.copytree(folder, run / "final")
    (run / "final" / "tokenizer.json").write_text("{}")
    (run / "summary.json").write_text("{}")

    assert cli_main(["export", str(run), "--to", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().out.startswith("wrote adapter (LoRA + memory) to ")
    assert set(os.listdir(tmp_path / "plain")) == PEFT_FILES | OUR_FILES | {"tokenizer.json"}
    assert torch.equal(logits(RMTModel.from_pretrained(str(tmp_path / "plain"))), logits(rmt))

    out = tmp_path / "merged"
    assert cli_main(["export", str(run), "--to", str(out), "--merge", "--push-to-hub", "me/merged"]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} | OUR_FILES <= files and not PEFT_FILES & files
    assert set(fake_hub[1][2]) == files
    monkeypatch.setitem(sys.modules, "peft", None)
    merged = RMTModel.from_pretrained(str(out))
    assert (logits(merged) - logits(rmt)).abs().max() < 0.05 * logits(rmt).abs().max()

    capsys.readouterr()
    assert cli_main(["export", str(out), "--to", str(tmp_path / "again"), "--merge"]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "neither an adapter folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "again") and not os.path.exists(tmp_path / "x")


def test_merge_export_of_a_run_on_a_model_built_from_a_config(write_recipe, tmp_path, capsys):
    recipe = load_recipe(write_recipe({"lora": "attention", "curriculum.segments": [1], "curriculum.steps_per_stage": 2,
                                       "eval.num_segments": [1], "training.learning_rate": 0.05}))
    run(recipe, log=lambda *_: None)
    merged = tmp_path / "merged"
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["export", recipe.output_dir, "--to", str(merged), "--merge", "--dtype", "float32"]) == 0
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
