"""Saving, loading, merging and pushing RMT models (rmt_peft/saving.py, through RMTModel.save_pretrained /
from_pretrained / merge_and_unload / push_to_hub): the saved files, round trips, bad input."""
import json
import os
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from rmt_peft import MemoryConfig, RMTModel, card, load_backbone
from rmt_peft.tiny_models import save_tiny_model

MEMORY = MemoryConfig(num_memory_tokens=4, segment_size=8)
IDS = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
OUR_FILES = {"memory_config.json", "memory.safetensors", "README.md"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"gpt_neo": save_tiny_model(str(root / "gpt_neo"), "gpt_neo"),
            "opt": save_tiny_model(str(root / "opt"), "opt"),
            "gpt2": save_tiny_model(str(root / "gpt2"), "gpt2"),
            "gpt_neo_128": save_tiny_model(str(root / "gpt_neo_128"), "gpt_neo", hidden_size=128)}


def trained(base, quantization=None, steps=2, lora=None):
    """An RMTModel with random-initialised LoRA (so merging has a visible effect), trained a little."""
    backbone = load_backbone(base, quantization=quantization, dtype="float32", quantization_backend="bitsandbytes")
    lora = lora or {"target_modules": "all-linear", "init_lora_weights": False, "r": 4, "lora_alpha": 4}
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, MEMORY, lora=lora, verbose=False).train()
    optimizer = torch.optim.AdamW([p for p in rmt.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        rmt(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return rmt.eval()


def logits(rmt):
    with torch.no_grad():
        return rmt(IDS).logits.float()


@pytest.fixture(scope="module")
def neo_adapter(bases, tmp_path_factory):
    rmt = trained(bases["gpt_neo"])
    folder = rmt.save_pretrained(str(tmp_path_factory.mktemp("saved") / "neo"))
    return rmt, folder


@pytest.mark.parametrize("architecture, quantization", [
    (arch, q) for arch in ("gpt_neo", "opt") for q in (None, "8bit", "4bit")
] + [("gpt2", "4bit")])  # GPT-2: Conv1D weights are stored transposed when quantized
def test_save_load_merge_round_trip(bases, tmp_path, architecture, quantization, monkeypatch):
    rmt = trained(bases[architecture], quantization)
    expected = logits(rmt)
    folder = rmt.save_pretrained(str(tmp_path / "adapter"))
    assert set(os.listdir(folder)) == PEFT_FILES | OUR_FILES

    loaded = RMTModel.from_pretrained(folder, quantization=quantization, dtype="float32")
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training

    merged = rmt.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.causal_lm.parameters())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    scale = expected.abs().max()
    with rmt.backbone.disable_adapter():
        lora_effect = (logits(rmt) - expected).abs().max()
    merged_error = (logits(merged) - expected).abs().max()
    assert merged_error < 0.03 * scale  # bf16 rounding
    assert lora_effect > 10 * merged_error  # the merge is what makes them match
    exact = (logits(rmt.merge_and_unload(torch.float32)) - expected).abs().max()
    assert exact < (1e-5 if quantization is None else 0.01) * scale  # 8/4-bit kernels round differently

    merged_folder = merged.save_pretrained(str(tmp_path / "merged"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(merged_folder))
    assert not PEFT_FILES & set(os.listdir(merged_folder))
    monkeypatch.setitem(sys.modules, "peft", None)  # the merged model loads without peft
    reloaded = RMTModel.from_pretrained(merged_folder)
    assert torch.equal(logits(reloaded), logits(merged))


def test_plain_peft_loads_the_lora_part(neo_adapter, bases):
    from peft import PeftModel, get_peft_model_state_dict

    rmt, folder = neo_adapter
    peft_model = PeftModel.from_pretrained(load_backbone(bases["gpt_neo"]), folder)
    got, want = get_peft_model_state_dict(peft_model), get_peft_model_state_dict(rmt.backbone)
    assert got.keys() == want.keys() and got
    assert all(torch.equal(got[k], want[k]) for k in want)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == bases["gpt_neo"]


def test_saved_files_describe_the_model(neo_adapter, bases):
    rmt, folder = neo_adapter
    with open(os.path.join(folder, "memory_config.json")) as f:
        assert MemoryConfig.from_dict(json.load(f)) == MEMORY
    tensors = load_file(os.path.join(folder, "memory.safetensors"))
    assert torch.equal(tensors["memory_tokens"], rmt.memory_tokens.detach())
    assert torch.equal(tensors["write_embedding"], rmt.write_embedding.detach())
    card = open(os.path.join(folder, "README.md")).read()
    header = card.split("---")[1]
    assert "library_name: peft" in header and "- rmt-peft" in header and "- lora" in header
    assert "base_model" not in header  # a local path is no Hub id
    assert "| `num_memory_tokens` | `4` |" in card and "| `segment_size` | `8` |" in card
    assert 'RMTModel.from_pretrained("path/to/neo")' in card  # no Hub id is known yet
    assert "license: other" in header and "its card could not be read" in card  # a local base without a card


def test_card_records_hub_base_and_quantization(bases, tmp_path):
    rmt = trained(bases["opt"], "4bit", steps=0)
    folder = rmt.save_pretrained(str(tmp_path / "q"), base_model="facebook/opt-125m", repo_id="me/opt-rmt")
    card = open(os.path.join(folder, "README.md")).read()
    assert "base_model: facebook/opt-125m" in card and "- 4bit" in card
    assert 'RMTModel.from_pretrained("me/opt-rmt", quantization="4bit", quant_type="nf4"' in card
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "facebook/opt-125m"
    # the recorded base is not reachable here: base_model= points at the moved local copy
    loaded = RMTModel.from_pretrained(folder, quantization="4bit", dtype="float32", base_model=bases["opt"])
    assert torch.equal(logits(loaded), logits(rmt))


def test_full_finetuning_saves_full_weights(bases, tmp_path):
    backbone = load_backbone(bases["gpt_neo"])
    rmt = RMTModel.from_backbone(backbone, MEMORY, verbose=False).train()
    rmt(IDS, labels=IDS).loss.backward()
    with torch.no_grad():
        for p in rmt.parameters():
            p -= 0.1 * p.grad
    rmt.eval()
    folder = rmt.save_pretrained(str(tmp_path / "full"))
    assert {"config.json", "model.safetensors"} | OUR_FILES <= set(os.listdir(folder))
    assert "library_name: transformers" in open(os.path.join(folder, "README.md")).read()
    loaded = RMTModel.from_pretrained(folder, is_trainable=True)
    assert loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded.eval()), logits(rmt))
    with pytest.raises(ValueError, match="nothing to merge|has none"):
        rmt.merge_and_unload()


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, str(tmp_path / "copy"))


def test_adapter_on_another_architecture_or_size(neo_adapter, bases):
    _, folder = neo_adapter
    with pytest.raises(ValueError, match=r"trained on a gpt_neo model with hidden size 64.*is opt with hidden size 64"):
        RMTModel.from_pretrained(folder, base_model=bases["opt"])
    with pytest.raises(ValueError, match=r"hidden size 64.*is gpt_neo with hidden size 128"):
        RMTModel.from_pretrained(folder, base_model=bases["gpt_neo_128"])


def test_adapter_on_a_base_built_from_a_config(tmp_path):
    """A run on tiny:<arch> has no checkpoint: from_pretrained rebuilds the frozen random weights
    from the run's recipe.yaml (architecture, config, training seed), as training built them."""
    from rmt_peft.tiny_models import tiny_model

    config = {"vocab_size": 64, "max_positions": 64}
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", seed=5, **config), MEMORY, verbose=False,
                                 lora={"target_modules": "attention", "init_lora_weights": False})
    run = tmp_path / "run"
    rmt.save_pretrained(str(run / "final"), base_model="tiny:gpt_neo")
    ids = IDS % 64
    with pytest.raises(ValueError, match="recipe.yaml, which is not beside it"):
        RMTModel.from_pretrained(str(run / "final"))
    (run / "recipe.yaml").write_text(json.dumps({"model": {"name_or_path": "tiny:gpt_neo", "config": config},
                                                 "training": {"seed": 5}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's warnings about the base are ours to silence
        loaded = RMTModel.from_pretrained(str(run / "final"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, rmt.eval()(ids).logits)
    assert loaded.causal_lm.name_or_path == "tiny:gpt_neo"


def test_memory_not_matching_its_config(neo_adapter, tmp_path):
    folder = copy_of(neo_adapter[1], tmp_path)
    config_path = os.path.join(folder, "memory_config.json")
    config = json.load(open(config_path))
    json.dump({**config, "num_memory_tokens": 6}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"memory.safetensors: memory_tokens has shape \(4, 64\).*num_memory_tokens=6"):
        RMTModel.from_pretrained(folder)
    json.dump({**config, "num_memory_tokenz": 4}, open(config_path, "w"))
    with pytest.raises(ValueError, match="unknown MemoryConfig field"):
        RMTModel.from_pretrained(folder)


def test_gated_memory_round_trip(bases, tmp_path):
    backbone = load_backbone(bases["gpt_neo"], dtype="float32")
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=4, segment_size=8, memory_update="gated"),
                                 lora={"target_modules": "all-linear", "r": 4}, verbose=False)
    rmt.memory.gate_weight.data.normal_()
    folder = rmt.save_pretrained(str(tmp_path / "gated"))
    assert sorted(load_file(os.path.join(folder, "memory.safetensors"))) == [
        "gate_bias", "gate_weight", "memory_tokens", "read_embedding", "write_embedding"]
    loaded = RMTModel.from_pretrained(folder)
    torch.testing.assert_close(logits(loaded), logits(rmt.eval()))
    config_path = os.path.join(folder, "memory_config.json")
    json.dump({**json.load(open(config_path)), "memory_update": "replace"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"holds memory tokens \(tensors .*gate_bias.*memory_update='replace'\) expects"):
        RMTModel.from_pretrained(folder)


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_associative_memory_round_trip(bases, tmp_path, quantization):
    backbone = load_backbone(bases["gpt_neo"], quantization=quantization, dtype="float32")
    torch.manual_seed(0)
    config = MemoryConfig(num_memory_tokens=4, segment_size=8, memory_kind="associative", associative_key_size=4)
    rmt = RMTModel.from_backbone(backbone, config, lora={"target_modules": "all-linear", "r": 4,
                                                         "init_lora_weights": False}, verbose=False)
    for layer in rmt.memory.associative.layers:
        layer.value.weight.data.normal_(0, 0.3)
    folder = rmt.save_pretrained(str(tmp_path / "associative"))
    saved = load_file(os.path.join(folder, "memory.safetensors"))
    assert len([n for n in saved if n.startswith("associative.layers.")]) == 2 * 5  # 2 layers x 5 tensors
    assert json.load(open(os.path.join(folder, "memory_config.json")))["memory_kind"] == "associative"
    loaded = RMTModel.from_pretrained(folder, quantization=quantization, dtype="float32")
    assert loaded.memory_config.associative
    # frozen like the loaded one: bitsandbytes' CPU 4-bit path rounds a trainable memory's reads differently
    rmt.memory.requires_grad_(False)
    assert torch.equal(logits(loaded), logits(rmt.eval()))
    expected = logits(rmt)
    merged_error = (logits(rmt.merge_and_unload(dtype=torch.float32)) - expected).abs().max()
    with rmt.backbone.disable_adapter():
        lora_effect = (logits(rmt) - expected).abs().max()
    # 4-bit kernels round differently from the dequantized merge, and reading the memory carries it on
    assert merged_error < (1e-5 if quantization is None else 0.03) * expected.abs().max()
    assert lora_effect > 10 * merged_error  # the merge is what makes them match
    # a folder whose config names the other kind is refused, naming both
    config_path = os.path.join(folder, "memory_config.json")
    json.dump({**json.load(open(config_path)), "memory_kind": "tokens"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"holds an associative memory .*memory_kind='tokens'"):
        RMTModel.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["memory.safetensors", "memory_config.json", "adapter_model.safetensors"])
def test_missing_file(neo_adapter, tmp_path, missing):
    folder = copy_of(neo_adapter[1], tmp_path)
    os.remove(os.path.join(folder, missing))
    with pytest.raises(FileNotFoundError, match=rf"has no {missing}"):
        RMTModel.from_pretrained(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json"):
        RMTModel.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        RMTModel.from_pretrained(str(tmp_path / "missing"))


def test_failed_save_leaves_nothing_half_written(neo_adapter, tmp_path, monkeypatch):
    rmt, _ = neo_adapter
    target = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(card, "write_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        rmt.save_pretrained(str(target))
    assert os.listdir(tmp_path) == []  # no target, no temporary folder
    monkeypatch.undo()
    rmt.save_pretrained(str(target))
    before = {n: open(target / n, "rb").read() for n in os.listdir(target)}
    monkeypatch.setattr(card, "write_model_card", broken)
    with pytest.raises(OSError):
        rmt.save_pretrained(str(target))
    assert os.listdir(tmp_path) == ["out"]
    assert {n: open(target / n, "rb").read() for n in os.listdir(target)} == before


def test_push_to_hub_uploads_exactly_the_saved_folder(neo_adapter, tmp_path, fake_hub):
    rmt, folder = neo_adapter
    assert rmt.push_to_hub("me/neo-rmt", private=True, token="tok") == "commit-info"
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[0][1:] == ("me/neo-rmt", True, True, "tok")
    uploaded = fake_hub[1][2]
    assert set(uploaded) == PEFT_FILES | OUR_FILES
    local = rmt.save_pretrained(str(tmp_path / "local"), repo_id="me/neo-rmt")
    for name in set(uploaded) - {"memory.safetensors"}:  # identical to what save_pretrained writes
        assert uploaded[name] == open(os.path.join(local, name), "rb").read(), name
    # (safetensors orders its metadata header freely: compare the tensors)
    from safetensors.torch import load
    pushed, saved = load(uploaded["memory.safetensors"]), load_file(os.path.join(local, "memory.safetensors"))
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    assert b'RMTModel.from_pretrained("me/neo-rmt")' in uploaded["README.md"]


def test_gpu_round_trip_script_tiny(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import gpu_adapter_roundtrip

    assert gpu_adapter_roundtrip.main(["--tiny", "--modes", "4bit", "--dtype", "float32", "--steps", "2",
                                       "--num-segments", "2", "--merge"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4bit")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[8]) == 0.0  # reload gives the same logits
    assert float(cells[9]) < 0.05  # merged within bf16 tolerance (logits of scale ~0.5)
