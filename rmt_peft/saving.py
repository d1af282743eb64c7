"""The saved folder of an RMTModel: what it holds and how its parts are written and read back.
``RMTModel.save_pretrained`` / ``from_pretrained`` / ``merge_and_unload`` (recurrent.py) use it.

A folder is a standard PEFT LoRA adapter with our memory beside it, so
``peft.PeftModel.from_pretrained`` still loads the LoRA part and nothing is patched:

    adapter_config.json        peft (records base_model_name_or_path)
    adapter_model.safetensors  peft: the LoRA weights
    memory_config.json         MemoryConfig.to_dict()
    memory.safetensors         memory_tokens, read_embedding, write_embedding (+ gate_weight, gate_bias for
                               memory_update="gated"), or memory_tokens and associative.layers.* for
                               memory_kind="associative" (memory_config.json says which), fp32; its header
                               records the backbone's model_type and hidden size, the base model
                               and the quantization the memory was trained with, for checks on load
    README.md                  model card with Hub metadata (card.py)

A model without LoRA (full fine-tuning of a small model, or a merged model) is saved as full
transformers weights instead (``config.json`` + ``model.safetensors``) with the same memory
files; it loads without peft. ``merged_causal_lm`` folds LoRA into a plain copy of the backbone
(dequantizing 8-bit / 4-bit weights) for deployment. Every save writes into a temporary folder
beside the target and renames it into place (``fileio.atomic_directory``).
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from . import hub, runs
from .adapters import quiet_peft
from .attention import GPT_NEO_SDPA, use_gpt_neo_sdpa
from .backbones import load_backbone
from .memory import MemoryConfig, memory_tensor_shapes
from .quantized_embedding import QuantizedEmbedding, QuantizedHead
from .quantized_linear import QuantizedLinear
from .speedups import FusedTanhGelu, use_fused_gelu
from .tiny_models import TINY_PREFIX, save_tiny_model

MEMORY_CONFIG_FILE = "memory_config.json"
MEMORY_WEIGHTS_FILE = "memory.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_CONFIG_FILE = "config.json"
CARD_FILE = hub.CARD_FILE
FORMAT = "rmt-peft/1"


# -- writing ------------------------------------------------------------------------------
def quantization_of(causal_lm) -> tuple[str | None, dict[str, Any]]:
    """("4bit" / "8bit" / "fp8" / None, the load_backbone options that reproduce it) of a loaded model."""
    held = {m.format for m in causal_lm.modules() if isinstance(m, QuantizedLinear)}
    if held:
        tables = any(isinstance(m, QuantizedEmbedding) for m in causal_lm.modules())
        return held.pop(), {"quantization_backend": "torch", "quantize_embeddings": tables}
    qc = getattr(causal_lm.config, "quantization_config", None)
    if qc is None:
        return None, {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("load_in_4bit"):
        return "4bit", {"quant_type": qc.get("bnb_4bit_quant_type", "nf4"),
                        "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False)),
                        "compute_dtype": str(qc.get("bnb_4bit_compute_dtype", "bfloat16")).replace("torch.", ""),
                        "quantization_backend": "bitsandbytes"}
    if qc.get("load_in_8bit"):
        return "8bit", {"quantization_backend": "bitsandbytes"}
    return None, {}


def lora_of(backbone):
    """The PeftModel ``backbone`` is, or None (full fine-tuning / merged model)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return backbone if isinstance(backbone, PeftModel) else None


def base_name(backbone, causal_lm, base_model: str | None = None) -> str | None:
    """The base a saved folder records: ``base_model``, else the one LoRA records, else where the
    backbone was loaded from (None when it was built in memory)."""
    peft_model = lora_of(backbone)
    recorded = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path if peft_model else None
    return base_model or recorded or causal_lm.name_or_path or None


def memory_metadata(causal_lm, base: str | None, num_layers: int) -> dict[str, str]:
    """The header of memory.safetensors: what the memory was trained on, checked when it loads.
    ``num_layers``: the associative memory's sets of projections (0: memory tokens only)."""
    quantization, options = quantization_of(causal_lm)
    return {"format": FORMAT, "model_type": causal_lm.config.model_type,
            "hidden_size": str(causal_lm.get_input_embeddings().embedding_dim), "num_layers": str(num_layers),
            "base_model": base or "", "quantization": quantization or "none",
            "quantization_options": json.dumps(options)}


def write_backbone(backbone, causal_lm, folder: str, base: str | None) -> None:
    """The LoRA adapter (peft's files, recording ``base``), or full weights without LoRA."""
    peft_model = lora_of(backbone)
    if peft_model is None:
        causal_lm.save_pretrained(folder)
        return
    with quiet_peft():
        peft_model.save_pretrained(folder, selected_adapters=[peft_model.active_adapter])
    if peft_model.active_adapter != "default":  # peft puts other adapters in a subfolder
        sub = os.path.join(folder, peft_model.active_adapter)
        for name in os.listdir(sub):
            os.replace(os.path.join(sub, name), os.path.join(folder, name))
        os.rmdir(sub)
    config_path = os.path.join(folder, ADAPTER_CONFIG_FILE)
    with open(config_path) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base
    with open(config_path, "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def write_memory(folder: str, memory_config: MemoryConfig, state: dict[str, torch.Tensor],
                 metadata: dict[str, str]) -> None:
    """memory_config.json and memory.safetensors (fp32, ``metadata`` in its header)."""
    with open(os.path.join(folder, MEMORY_CONFIG_FILE), "w") as f:
        json.dump(memory_config.to_dict(), f, indent=2)
    tensors = {n: t.detach().float().cpu().contiguous() for n, t in state.items()}
    save_file(tensors, os.path.join(folder, MEMORY_WEIGHTS_FILE), metadata=metadata)


# -- reading ------------------------------------------------------------------------------
def resolve_folder(name_or_path: str, revision: str | None = None, token: str | None = None) -> str:
    """A local folder as it is, or a Hub repo id downloaded to the local cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if hub.looks_like_path(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is not a folder (expected an adapter folder saved by "
                                f"RMTModel.save_pretrained, or a Hub repo id like 'user/name')")
    return hub.download(name_or_path, revision, token)


def _require(folder: str, name: str, what: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {name} ({what}); it is not a complete rmt-peft folder "
                                f"saved by RMTModel.save_pretrained")
    return path


def read_memory(folder: str) -> tuple[MemoryConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(MemoryConfig, memory tensors, metadata) of a saved folder, checked against each other."""
    with open(_require(folder, MEMORY_CONFIG_FILE, "the memory settings")) as f:
        memory_config = MemoryConfig.from_dict(json.load(f))
    path = _require(folder, MEMORY_WEIGHTS_FILE, "the memory weights")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != FORMAT or "hidden_size" not in metadata:
        raise ValueError(f"{path} has no {FORMAT} metadata (format, model_type, hidden_size); it was not "
                         f"written by RMTModel.save_pretrained of this version")
    shapes = memory_tensor_shapes(memory_config, int(metadata["hidden_size"]), int(metadata.get("num_layers", 0)))
    if sorted(tensors) != sorted(shapes):
        holds = "an associative memory" if any(k.startswith("associative.") for k in tensors) else "memory tokens"
        raise ValueError(f"{path} holds {holds} (tensors {_names(tensors)}); {MEMORY_CONFIG_FILE} (memory_kind="
                         f"{memory_config.memory_kind!r}, memory_update={memory_config.memory_update!r}) expects "
                         f"{_names(shapes)}: the files do not belong together")
    for name, tensor in tensors.items():
        expected = shapes[name]
        if tuple(tensor.shape) != expected:
            key_size = f", associative_key_size={memory_config.associative_key_size}" if memory_config.associative else ""
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)} but {MEMORY_CONFIG_FILE} says "
                             f"num_memory_tokens={memory_config.num_memory_tokens}{key_size} and the backbone's hidden "
                             f"size is {metadata['hidden_size']} (expected shape {expected}); the files do not belong "
                             f"together")
    return memory_config, tensors, metadata


def _names(tensors) -> str:
    """Tensor names for a message, the associative layers' folded into one pattern."""
    names = sorted({re.sub(r"^associative\.layers\.\d+\.", "associative.layers.N.", n) for n in tensors})
    return str(names)


def read_metadata(folder: str) -> dict[str, str]:
    """The metadata header of ``memory.safetensors`` (model_type, hidden_size, base_model, ...)."""
    with safe_open(_require(folder, MEMORY_WEIGHTS_FILE, "the memory weights"), framework="pt") as f:
        return f.metadata() or {}


def folder_kind(folder: str) -> str:
    """"lora" for a PEFT adapter folder, "full" for full model weights; raises for anything else."""
    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_FILE)):
        if not any(os.path.isfile(os.path.join(folder, n)) for n in ADAPTER_WEIGHTS_FILES):
            raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS_FILES[0]} (the LoRA weights) beside "
                                f"{ADAPTER_CONFIG_FILE}")
        return "lora"
    if os.path.isfile(os.path.join(folder, MODEL_CONFIG_FILE)):
        return "full"
    raise FileNotFoundError(f"{folder} has neither {ADAPTER_CONFIG_FILE} (a LoRA adapter) nor "
                            f"{MODEL_CONFIG_FILE} (full model weights); it is not a folder saved by "
                            f"RMTModel.save_pretrained")


def validate_folder(folder: str) -> str:
    """Raise when ``folder`` is not complete; returns its kind ("lora" / "full")."""
    kind = folder_kind(folder)
    read_memory(folder)
    _require(folder, CARD_FILE, "the model card")
    return kind


def recorded_base(folder: str) -> str | None:
    """The base model a LoRA adapter folder records (adapter_config.json), or None."""
    config = os.path.join(folder, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("base_model_name_or_path") or None


def check_backbone(backbone_config, embedding_dim: int, metadata: dict[str, str], folder: str, source: str) -> None:
    """Raise ValueError when the loaded backbone is not the kind the adapter was trained on."""
    trained = (metadata.get("model_type"), int(metadata.get("hidden_size", -1)))
    found = (backbone_config.model_type, embedding_dim)
    if trained != found:
        raise ValueError(f"the adapter in {folder} was trained on a {trained[0]} model with hidden size {trained[1]} "
                         f"(base {metadata.get('base_model') or 'unknown'!r}), but the backbone loaded from "
                         f"{source!r} is {found[0]} with hidden size {found[1]}; load it onto its own base model")


def rebuild_config_base(folder: str, base: str, into: str) -> str | None:
    """A backbone built from a config (``tiny:<arch>``) has no checkpoint: rebuild its frozen random
    weights (same architecture, config and seed as in training) from the recipe.yaml of the run that
    ``folder`` belongs to (``folder`` is its final/ or baseline/final/) into ``into``; None for any
    other base (loaded from its name)."""
    if not base.startswith(TINY_PREFIX):
        return None
    recipe, _ = runs.read_run(runs.run_folder(folder))
    if not recipe:
        raise ValueError(f"{folder} was trained on {base} (random weights built from a config, no checkpoint); "
                         f"loading it rebuilds them from its training run's {runs.RUN_RECIPE_FILE}, which is not beside "
                         f"it: load the run's {runs.FINAL_DIR}/ folder, or pass base_model= (--base-model)")
    seed = runs.seed_of(recipe.get("training") or {})
    return save_tiny_model(into, base[len(TINY_PREFIX):], seed=seed, **((recipe.get("model") or {}).get("config") or {}))


def load_saved_backbone(folder: str, kind: str, metadata: dict[str, str], base_model: str | None = None,
                        is_trainable: bool = False, **load_kwargs):
    """The backbone of a saved folder of ``kind`` (``folder_kind``), checked against the memory's
    ``metadata``. LoRA folders:
    loaded from ``base_model`` (default: the base adapter_config.json records; pass it when the
    base moved) with ``load_backbone``'s options, then LoRA through peft; a base built from a
    config (``tiny:<arch>``) is rebuilt from the training run's recipe. Full folders: the folder
    itself. Frozen unless ``is_trainable``."""
    if kind == "lora":
        base = base_model or recorded_base(folder)
        if not base:
            raise ValueError(f"{folder}/{ADAPTER_CONFIG_FILE} records no base_model_name_or_path; "
                             f"pass base_model= (the model the adapter was trained on)")
    else:
        if base_model is not None:
            raise ValueError(f"base_model= applies to LoRA adapter folders; {folder} holds full model weights")
        base = folder
    with tempfile.TemporaryDirectory() as rebuilt:
        source = rebuild_config_base(folder, base, rebuilt) if kind == "lora" else None
        backbone = load_backbone(source or base, **load_kwargs)
    if source:  # peft compares the name with the adapter's base_model_name_or_path
        backbone.name_or_path = backbone.config._name_or_path = base
    check_backbone(backbone.config, backbone.get_input_embeddings().embedding_dim, metadata, folder, base)
    if kind == "full":
        for p in backbone.parameters():
            p.requires_grad_(p.requires_grad and is_trainable)
        return backbone
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(backbone, folder, is_trainable=is_trainable)


# -- merging ------------------------------------------------------------------------------
def _base_tensor(causal_lm, name: str, plain) -> torch.Tensor:
    """Parameter or buffer ``name`` of the model under LoRA, dequantized if bitsandbytes holds it,
    in the layout of the same tensor of the plain model ``plain``."""
    module_name, _, leaf = name.rpartition(".")
    module = causal_lm.get_submodule(module_name) if module_name else causal_lm
    if hasattr(module, "get_base_layer"):  # a peft LoRA layer: the original layer is inside
        module = module.get_base_layer()
    # GPT-2's Conv1D layers (weight stored as in x out) are quantized as Linear layers (out x in)
    transpose = (leaf == "weight" and isinstance(plain.get_submodule(module_name), Conv1D)
                 and not isinstance(module, Conv1D))
    if isinstance(module, (QuantizedEmbedding, QuantizedHead)) and leaf == "weight":
        return module.dequantize()
    tensor = getattr(module, leaf)
    kind = tensor.__class__.__name__
    if kind == "Params4bit" and getattr(tensor.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first eval forward; restore
        # the standard layout first, in place, as bitsandbytes does itself before saving.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        tensor.data, tensor.quant_state = _convert_weight_packed_for_cpu_inverse(tensor.data, tensor.quant_state)
    if isinstance(module, QuantizedLinear) and leaf == "weight":
        tensor = module.dequantize()
    elif kind in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        tensor = dequantize_bnb_weight(tensor, state=getattr(module, "state", None))
    return tensor.detach().t() if transpose else tensor.detach()


def merged_causal_lm(peft_model, source, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A plain ``dtype`` copy of ``source``, the causal LM under ``peft_model``, with LoRA merged in, built on
    ``device``: 8-bit / 4-bit weights are dequantized first, so it computes what the trained
    (quantized) model computed, up to ``dtype`` rounding, with the same exact speed-ups."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    gpt_neo_sdpa = getattr(config, "_attn_implementation", None) == GPT_NEO_SDPA
    if gpt_neo_sdpa:  # transformers builds GPT-Neo eager only; switched back below
        config._attn_implementation = "eager"
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict({name: _base_tensor(source, name, plain).to(device, dtype) for name in plain.state_dict()},
                          strict=True)
    adapter = peft_model.active_adapter
    with quiet_peft():
        lora_state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
        lora = get_peft_model(plain, copy.deepcopy(peft_model.peft_config[adapter]))
    # LoRA stays fp32 (peft upcasts adapters): the delta is computed in fp32, rounded once when added.
    set_peft_model_state_dict(lora, {k: v.detach().to(device) for k, v in lora_state.items()})
    merged = lora.merge_and_unload().eval()
    merged.name_or_path = peft_model.peft_config[adapter].base_model_name_or_path or source.name_or_path
    for p in merged.parameters():
        p.requires_grad_(False)
    if gpt_neo_sdpa:
        use_gpt_neo_sdpa(merged)
    if any(isinstance(m, FusedTanhGelu) for m in source.modules()):
        use_fused_gelu(merged)
    return merged
