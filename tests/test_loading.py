"""What eval, ask and export open (rmt_peft/loading.py): what a path names, which tokenizer, damaged
weight files and bad --device values named, and a run's model loaded with memory overrides. The
commands end to end are tests/eval/test_command.py's and tests/test_ask_command.py's."""
import json
import types

import pytest
import torch

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.errors import UserError
from rmt_peft.loading import (adapter_folder, base_model, check_weight_files, command_tokenizer, load_model, locate,
                              model_device, read_recipe, tokenizer_name)
from rmt_peft.recipe import load_recipe
from rmt_peft.tiny_models import tiny_model


@pytest.fixture
def layout(tmp_path):
    """run/ (recipe.yaml + final/), adapter/ (memory_config.json, a LoRA adapter_config.json), empty/."""
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "memory_config.json").write_text("{}")
    (tmp_path / "run" / "recipe.yaml").write_text("")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "memory_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "me/base"}))
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_a_path_is_a_run_an_adapter_folder_or_a_hub_id(layout):
    assert locate(str(layout / "run")) == (str(layout / "run" / "final"), str(layout / "run" / "recipe.yaml"))
    assert locate(str(layout / "run" / "final")) == (str(layout / "run" / "final"), str(layout / "run" / "recipe.yaml"))
    assert locate(str(layout / "adapter")) == (str(layout / "adapter"), None)
    assert locate("me/model") == ("me/model", None)
    with pytest.raises(UserError, match=r"empty is neither a training run \(recipe.yaml \+ final/\) nor an adapter "
                                        r"folder \(memory_config.json\)"):
        locate(str(layout / "empty"))
    with pytest.raises(UserError, match="missing is not a folder"):
        locate(str(layout / "missing"))
    # export: local folders only
    assert adapter_folder(str(layout / "run")) == str(layout / "run" / "final")
    assert adapter_folder(str(layout / "adapter")) == str(layout / "adapter")
    with pytest.raises(FileNotFoundError, match="neither an adapter folder"):
        adapter_folder(str(layout / "empty"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        adapter_folder("me/model")
    assert base_model(str(layout / "adapter")) == "me/base"
    assert base_model(str(layout / "empty")) == str(layout / "empty")  # full weights hold their own tokenizer
    assert read_recipe(None) is None


def test_the_tokenizer_is_the_first_of_flag_recipe_adapter_offline_model_base(write_recipe, layout):
    tiny = load_recipe(write_recipe())
    named = load_recipe(write_recipe({"model.tokenizer": "me/tok"}))
    hub = load_recipe(write_recipe({"model": {"name_or_path": "me/model"}}), check_files=False)  # not looked up
    adapter = str(layout / "adapter")
    assert tokenizer_name(named, adapter, "flag/tok") == "flag/tok"
    assert tokenizer_name(named, adapter) == "me/tok"
    assert tokenizer_name(tiny, None) == "offline"
    (layout / "adapter" / "tokenizer_config.json").write_text("{}")
    assert tokenizer_name(tiny, adapter) == adapter  # the adapter's own files before the offline one
    assert tokenizer_name(None, str(layout / "run" / "final")) == str(layout / "run" / "final")
    (layout / "adapter" / "tokenizer_config.json").unlink()
    assert tokenizer_name(None, adapter) == "me/base"
    assert tokenizer_name(hub, adapter) == "me/model"  # the recipe's model before the adapter's recorded base


def test_a_tokenizer_that_cannot_be_loaded_is_one_line_naming_the_flag(write_recipe, layout):
    tiny = load_recipe(write_recipe())
    assert len(command_tokenizer(tiny, str(layout / "adapter"), None)) > 100  # the offline tokenizer
    with pytest.raises(UserError, match=r"^--tokenizer './no/such' does not exist"):
        command_tokenizer(tiny, str(layout / "adapter"), "./no/such")
    with pytest.raises(UserError, match=r"^--tokenizer '.*empty' could not be loaded: "):
        command_tokenizer(tiny, str(layout / "adapter"), str(layout / "empty"))


def test_a_damaged_weight_or_json_file_is_named(tmp_path):
    check_weight_files(str(tmp_path / "me" / "model"))  # not a folder (a Hub id): nothing to check
    (tmp_path / "memory_config.json").write_text('{"num_memory_tokens": 4}')
    (tmp_path / "notes.txt").write_text("{")
    check_weight_files(str(tmp_path))
    (tmp_path / "memory.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match=r"memory.safetensors is damaged or not a safetensors file"):
        check_weight_files(str(tmp_path))
    (tmp_path / "memory.safetensors").unlink()
    (tmp_path / "memory_config.json").write_text('{"num_memory_tokens": ')
    with pytest.raises(UserError, match=r"memory_config.json is damaged or not JSON"):
        check_weight_files(str(tmp_path))


def test_device_flags_are_checked(monkeypatch):
    def args(device):
        return types.SimpleNamespace(device=device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_device(args(None)) == torch.device("cpu") and model_device(args("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="--device 'gpu0' is not a device; allowed: cpu, cuda, cuda:N"):
        model_device(args("gpu0"))
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is available here; use --device cpu"):
        model_device(args("cuda"))
    with pytest.raises(UserError, match="--device 'meta' is not supported"):
        model_device(args("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert model_device(args(None)) == torch.device("cuda")
    assert model_device(args("cuda:1")) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="this machine has 2 CUDA GPU\\(s\\), cuda:0 to cuda:1"):
        model_device(args("cuda:2"))


def test_a_saved_model_loads_in_eval_mode_with_memory_overrides(tmp_path):
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", vocab_size=64, max_positions=64),
                                 MemoryConfig(num_memory_tokens=4, segment_size=8), lora=None, verbose=False)
    folder = rmt.save_pretrained(str(tmp_path / "full"))
    flags = types.SimpleNamespace(device="cpu", dtype=None, quantization=None, base_model=None)
    loaded = load_model(folder, None, flags, {"segment_size": 16})
    assert not loaded.training and loaded.memory_config.segment_size == 16
    assert loaded.memory_config.num_memory_tokens == 4
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same weights, reading segments of 16
        rmt.memory_config = MemoryConfig(num_memory_tokens=4, segment_size=16)
        torch.testing.assert_close(loaded(ids).logits, rmt.eval()(ids).logits)
    with pytest.raises(UserError, match="num_memory_tokens cannot be overridden"):
        load_model(folder, None, flags, {"num_memory_tokens": 2})
    with pytest.raises(UserError, match=r"memory overrides \['segment_size'\]: .*positions"):
        load_model(folder, None, flags, {"segment_size": 64})  # 64 + 2 x 4 memory > 64 positions
    with pytest.raises(UserError, match="--dtype 'float8' is not allowed"):
        load_model(folder, None, types.SimpleNamespace(**{**vars(flags), "dtype": "float8"}), {})
    with pytest.raises(UserError, match=r"^cannot load .*missing"):
        load_model(str(tmp_path / "missing"), None, flags, {})
