"""How a frozen backbone is quantized (rmt_peft/quantization.py): which backend holds the weights
and why, bitsandbytes' settings, and the device a device_map puts the weights on. Loading quantized
backbones is tests/test_backbones.py's and tests/test_quantized_linear.py's."""
import logging

import pytest
import torch

from rmt_peft import quantization as q
from rmt_peft.errors import UserError
from rmt_peft.quantization import choose_backend


def test_backend_choice():
    assert choose_backend(None, "auto", "cuda") == (None, None)
    for quantization in ("8bit", "4bit"):
        assert choose_backend(quantization, "auto", "cuda", torchao=True)[0] == "torch"
        backend, why = choose_backend(quantization, "auto", "cpu", torchao=True)
        assert backend == "bitsandbytes" and "'cpu'" in why  # CPU: as before
        assert choose_backend(quantization, "bitsandbytes", "cuda") == ("bitsandbytes", None)
    backend, why = choose_backend("4bit", "auto", "cuda", torchao=False)
    assert backend == "bitsandbytes" and "torchao" in why
    backend, why = choose_backend("4bit", "auto", "cuda", ("quant_type='fp4'",), torchao=True)
    assert backend == "bitsandbytes" and "quant_type='fp4'" in why
    assert choose_backend("fp8", "auto", "cuda") == ("torch", None)


@pytest.mark.parametrize("args, words", [
    (("fp8", "bitsandbytes", "cuda"), ["quantization='fp8'", "'auto' or 'torch'"]),
    (("8bit", "cuda", "cuda"), ["quantization_backend='cuda'", "bitsandbytes", "torch"]),
    (("3bit", "auto", "cuda"), ["quantization='3bit'", "fp8"]),
    (("4bit", "torch", "cuda", ("double_quant=False",)), ["double_quant=False", "bitsandbytes"]),
    (("8bit", "torch", "multi"), ["one device"]),
])
def test_backend_errors_name_the_setting_and_what_is_allowed(args, words):
    with pytest.raises(UserError) as err:
        choose_backend(*args)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_quantization_config_options():
    four = q.quantization_config("4bit", torch.float32, quant_type="fp4", double_quant=False,
                                 quant_storage=torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("fp4", False)
    assert four.bnb_4bit_compute_dtype == torch.float32 and four.bnb_4bit_quant_storage == torch.bfloat16
    default = q.quantization_config("4bit")
    assert (default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant) == ("nf4", True)
    assert default.bnb_4bit_compute_dtype == torch.bfloat16
    eight = q.quantization_config("8bit", int8_threshold=4.0)
    assert eight.load_in_8bit and eight.llm_int8_threshold == 4.0
    assert q.quantization_config(None) is None
    with pytest.raises(ValueError, match="quantization='3bit'.*allowed"):
        q.quantization_config("3bit")
    with pytest.raises(ValueError, match="quant_type='int4'.*nf4"):
        q.quantization_config("4bit", quant_type="int4")


def test_target_device_from_device_map():
    assert q.target_device({"": "cpu"}) == "cpu"
    assert q.target_device("cpu") == "cpu"
    assert q.target_device({"transformer": "cuda:1", "lm_head": "cpu"}) == "cuda"
    assert q.target_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_one_device_of_a_device_map(monkeypatch):
    assert q.single_device({"": "cpu"}) == torch.device("cpu")
    assert q.single_device({"transformer": "cpu", "lm_head": "cpu"}) == torch.device("cpu")
    assert q.single_device({"transformer": "cuda:1", "lm_head": "cpu"}) is None  # several
    assert q.single_device("cpu") == torch.device("cpu")
    assert q.single_device(1) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert q.single_device(None) == torch.device("cpu") and q.single_device("auto") == torch.device("cpu")
    assert q.target_device(0) == "cpu" and q.target_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert q.single_device("auto") == torch.device("cuda", 3) and q.single_device("cuda") == torch.device("cuda", 3)
    assert q.single_device("cuda:0") == torch.device("cuda", 0)
    assert q.target_device(0) == "cuda" and q.target_device({"a": "disk", "b": "cpu"}) == "cpu"


def test_the_backend_for_a_device_names_the_4bit_options_only_bitsandbytes_has(caplog):
    with caplog.at_level(logging.INFO, logger="rmt_peft"):
        assert q.backend_for("4bit", "auto", torch.device("cpu")) == "bitsandbytes"
        assert q.backend_for("4bit", "torch", torch.device("cpu")) == "torch"  # asked for: no choice to log
        assert q.backend_for(None, "auto", torch.device("cpu")) is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["quantization='4bit' held by bitsandbytes: the weights go to 'cpu', not a CUDA GPU; "
                    "load_backbone(quantization_backend=...) (recipes: model.quantization_backend) overrides"]
    with pytest.raises(UserError, match=r"^quant_type='fp4', double_quant=False exist\(s\) only in bitsandbytes"):
        q.backend_for("4bit", "torch", torch.device("cpu"), quant_type="fp4", double_quant=False)
    with pytest.raises(UserError, match="holds the whole model on one device"):
        q.backend_for("8bit", "torch", None)  # a device map over several devices
    # 8-bit has no 4-bit options to refuse
    assert q.backend_for("8bit", "torch", torch.device("cpu"), quant_type="fp4") == "torch"
