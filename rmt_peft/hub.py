"""Adapters that travel: save, load, merge and push an RMTModel.

An adapter folder is a standard PEFT LoRA adapter with our memory beside it, so
``peft.PeftModel.from_pretrained`` still loads the LoRA part and nothing is patched:

    adapter_config.json        peft (records base_model_name_or_path)
    adapter_model.safetensors  peft: the LoRA weights
    memory_config.json         MemoryConfig.to_dict()
    memory.safetensors         memory_tokens, read_embedding, write_embedding (+ gate_weight, gate_bias for
                               memory_update="gated"), or memory_tokens and associative.layers.* for
                               memory_kind="associative" (memory_config.json says which), fp32; its header
                               records the backbone's model_type and hidden size, the base model
                               and the quantization the memory was trained with, for checks on load
    README.md                  model card with Hub metadata (base_model, library_name, tags)

A model without LoRA (full fine-tuning of a small model, or a merged model) is saved as full
transformers weights instead (``config.json`` + ``model.safetensors``) with the same memory
files; it loads without peft. ``merge`` folds LoRA into a bf16 copy of the backbone
(dequantizing 8-bit / 4-bit weights) for deployment.

Every save writes into a temporary folder beside the target and renames it into place, so a
failed save leaves the target as it was and nothing half-written.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import huggingface_hub
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .adapters import quiet_peft
from .attention import GPT_NEO_SDPA, use_gpt_neo_sdpa
from .backbones import load_backbone
from .data.noise import PRESETS
from .memory import MemoryConfig, memory_tensor_shapes
from .quantized_linear import QuantizedLinear
from .runs import FINAL_DIR, RUN_RECIPE_FILE, RUN_SUMMARY_FILE, read_run, run_folder
from .speedups import FusedTanhGelu, use_fused_gelu
from .tiny_models import TINY_PREFIX, save_tiny_model

if TYPE_CHECKING:  # for annotations only: recurrent.py imports this module (RMTModel's save / load / merge)
    from .recurrent import RMTModel

MEMORY_CONFIG_FILE = "memory_config.json"
MEMORY_WEIGHTS_FILE = "memory.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "rmt-peft/1"


# -- writing ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a temporary folder beside ``target``; on success it replaces ``target``."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"cannot save to {target}: it exists and is not a folder")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        # mkdtemp makes the folder private and safetensors its files (0600); a saved model is meant to be shared
        os.chmod(tmp, 0o755)
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        if os.path.exists(target):
            old = tmp + ".old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # put the previous save back
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new save is in place; a leftover is a temp file
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantization_of(causal_lm) -> tuple[str | None, dict[str, Any]]:
    """("4bit" / "8bit" / "fp8" / None, the load_backbone options that reproduce it) of a loaded model."""
    held = {m.format for m in causal_lm.modules() if isinstance(m, QuantizedLinear)}
    if held:
        return held.pop(), {"quantization_backend": "torch"}
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


def _lora_of(rmt: "RMTModel"):
    """The PeftModel inside ``rmt`` or None (full fine-tuning / merged model)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return rmt.backbone if isinstance(rmt.backbone, PeftModel) else None


def save_pretrained(rmt: "RMTModel", save_directory: str, base_model: str | None = None,
                    repo_id: str | None = None, extra_files: list[str] = ()) -> str:
    """Write ``rmt`` to ``save_directory`` (see the module docstring for the layout).

    base_model: the name recorded as the base (default: where the backbone was loaded from);
    needed when the backbone was built in memory. repo_id: the Hub name used in the card.
    extra_files: other files to put beside the model (a tokenizer's files, for instance).
    """
    peft_model = _lora_of(rmt)
    causal_lm = rmt.causal_lm
    if peft_model is not None:
        adapter = peft_model.active_adapter
        recorded = peft_model.peft_config[adapter].base_model_name_or_path
        base = base_model or recorded or causal_lm.name_or_path or None
    else:
        base = base_model or causal_lm.name_or_path or None
    quantization, options = quantization_of(causal_lm)
    metadata = {"format": FORMAT, "model_type": causal_lm.config.model_type,
                "hidden_size": str(causal_lm.get_input_embeddings().embedding_dim),
                # the associative memory has a set of projections per decoder layer (0: memory tokens only)
                "num_layers": str(len(rmt.memory.associative.layers) if rmt.memory_config.associative else 0),
                "base_model": base or "", "quantization": quantization or "none",
                "quantization_options": json.dumps(options)}
    with atomic_directory(save_directory) as tmp:
        if peft_model is not None:
            with quiet_peft():
                peft_model.save_pretrained(tmp, selected_adapters=[peft_model.active_adapter])
            if peft_model.active_adapter != "default":  # peft puts other adapters in a subfolder
                sub = os.path.join(tmp, peft_model.active_adapter)
                for name in os.listdir(sub):
                    os.replace(os.path.join(sub, name), os.path.join(tmp, name))
                os.rmdir(sub)
            config_path = os.path.join(tmp, ADAPTER_CONFIG_FILE)
            with open(config_path) as f:
                adapter_config = json.load(f)
            adapter_config["base_model_name_or_path"] = base
            with open(config_path, "w") as f:
                json.dump(adapter_config, f, indent=2, sort_keys=True)
        else:
            causal_lm.save_pretrained(tmp)
        with open(os.path.join(tmp, MEMORY_CONFIG_FILE), "w") as f:
            json.dump(rmt.memory_config.to_dict(), f, indent=2)
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in rmt.memory.state_dict().items()}
        save_file(tensors, os.path.join(tmp, MEMORY_WEIGHTS_FILE), metadata=metadata)
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        write_model_card(tmp, repo_id)
    return save_directory


# -- reading ------------------------------------------------------------------------------
def resolve_folder(name_or_path: str, revision: str | None = None, token: str | None = None) -> str:
    """A local folder as it is, or a Hub repo id downloaded to the local cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path!r} is not a folder (expected an adapter folder saved by "
                                f"RMTModel.save_pretrained, or a Hub repo id like 'user/name')")
    try:
        return snapshot_download(repo_id=name_or_path, revision=revision, token=token)
    except Exception as err:
        raise OSError(f"{name_or_path!r} is not a local folder and could not be downloaded from the "
                      f"Hugging Face Hub ({type(err).__name__}: {err})") from err


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
    recipe, _ = read_run(run_folder(folder))
    if not recipe:
        raise ValueError(f"{folder} was trained on {base} (random weights built from a config, no checkpoint); "
                         f"loading it rebuilds them from its training run's {RUN_RECIPE_FILE}, which is not beside "
                         f"it: load the run's {FINAL_DIR}/ folder, or pass base_model= (--base-model)")
    seed = int((recipe.get("training") or {}).get("seed", 42))  # the Trainer's default, as in training
    return save_tiny_model(into, base[len(TINY_PREFIX):], seed=seed, **((recipe.get("model") or {}).get("config") or {}))


def from_pretrained(name_or_path: str, quantization: str | None = None, dtype=None, device_map=None,
                    base_model: str | None = None, is_trainable: bool = False, revision: str | None = None,
                    token: str | None = None, *, model_class, **load_kwargs) -> "RMTModel":
    """Rebuild an RMTModel from a saved folder or Hub repo.

    LoRA folders: the backbone is loaded from ``base_model`` (default: ``base_model_name_or_path``
    of adapter_config.json; pass it when the base moved) with ``quantization`` / ``dtype`` /
    ``device_map`` / other ``load_backbone`` options, then LoRA through peft and the memory. A base
    built from a config (``tiny:<arch>``) is rebuilt from the training run's recipe.yaml.
    Full folders load the backbone from the folder itself. The model comes back in eval mode
    and frozen unless ``is_trainable``. ``model_class``: the class to build, ``RMTModel`` or a
    subclass (``RMTModel.from_pretrained`` passes its own: this module sits below recurrent.py).
    """
    folder = resolve_folder(name_or_path, revision, token)
    kind = folder_kind(folder)
    memory_config, tensors, metadata = read_memory(folder)
    if kind == "lora":
        with open(os.path.join(folder, ADAPTER_CONFIG_FILE)) as f:
            base = base_model or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{folder}/{ADAPTER_CONFIG_FILE} records no base_model_name_or_path; "
                             f"pass base_model= (the model the adapter was trained on)")
    else:
        if base_model is not None:
            raise ValueError(f"base_model= applies to LoRA adapter folders; {folder} holds full model weights")
        base = folder
    with tempfile.TemporaryDirectory() as rebuilt:
        source = rebuild_config_base(folder, base, rebuilt) if kind == "lora" else None
        backbone = load_backbone(source or base, quantization=quantization, dtype=dtype, device_map=device_map,
                                 **load_kwargs)
    if source:  # peft compares the name with the adapter's base_model_name_or_path
        backbone.name_or_path = backbone.config._name_or_path = base
    check_backbone(backbone.config, backbone.get_input_embeddings().embedding_dim, metadata, folder, base)
    if kind == "lora":
        from peft import PeftModel

        with quiet_peft():
            backbone = PeftModel.from_pretrained(backbone, folder, is_trainable=is_trainable)
    else:
        for p in backbone.parameters():
            p.requires_grad_(p.requires_grad and is_trainable)
    rmt = model_class(backbone, memory_config)
    device = rmt.memory.memory_tokens.device
    rmt.memory.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    rmt.memory.requires_grad_(is_trainable)
    return rmt.train(is_trainable)


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


def merge(rmt: "RMTModel", dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> "RMTModel":
    """A new RMTModel whose backbone is a plain ``dtype`` copy of ``rmt``'s with LoRA merged in.

    8-bit / 4-bit weights are dequantized first, so the merged model computes what the trained
    (quantized) model computed, up to ``dtype`` rounding. The copy is built on ``device`` (the
    CPU by default, so a GPU holding the trained model needs no room for it) and needs no peft
    to load once saved; ``rmt`` is left unchanged.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    peft_model = _lora_of(rmt)
    if peft_model is None:
        raise ValueError("merge needs a model with LoRA adapters; this RMTModel has none (save it as it is)")
    source = rmt.causal_lm
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    gpt_neo_sdpa = getattr(config, "_attn_implementation", None) == GPT_NEO_SDPA
    if gpt_neo_sdpa:  # transformers builds GPT-Neo eager only; switched back below
        config._attn_implementation = "eager"
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name in plain.state_dict():
        state[name] = _base_tensor(source, name, plain).to(device, dtype)
    plain.load_state_dict(state, strict=True)
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
    # the same exact speed-ups as the source, so the copy computes what it computed
    if gpt_neo_sdpa:
        use_gpt_neo_sdpa(merged)
    if any(isinstance(m, FusedTanhGelu) for m in source.modules()):
        use_fused_gelu(merged)
    out = type(rmt)(merged, rmt.memory_config)
    out.pad_lm_head = rmt.pad_lm_head
    out.memory.load_state_dict({k: v.detach().to(device) for k, v in rmt.memory.state_dict().items()})
    return out.eval()


# -- the Hub ------------------------------------------------------------------------------
def validate_folder(folder: str) -> str:
    """Raise when ``folder`` is not complete; returns its kind ("lora" / "full")."""
    kind = folder_kind(folder)
    read_memory(folder)
    _require(folder, CARD_FILE, "the model card")
    return kind


def push_folder(folder: str, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None):
    """Create ``repo_id`` (if needed) and upload ``folder`` as it is; returns the commit info."""
    validate_folder(folder)
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                             commit_message=commit_message or "Upload rmt-peft model")


def push_to_hub(rmt: "RMTModel", repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, base_model: str | None = None):
    """Save ``rmt`` to a temporary folder and upload exactly that folder to ``repo_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(rmt, os.path.join(tmp, "model"), base_model=base_model, repo_id=repo_id)
        return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


# -- the model card -----------------------------------------------------------------------
DATASET_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "webdataset", "imagefolder", "audiofolder"}


def hub_repo_id(name: str | None) -> str | None:
    """``name`` when it is a valid Hub repo id; None for local paths and models built from a config
    (``tiny:gpt_neo``), which a card's ``base_model`` must not name."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def recipe_datasets(recipe: dict) -> list[str]:
    """Hub datasets a recipe reads: noise / document presets and ``path`` options that are repo ids."""
    found = []

    def visit(value):
        if isinstance(value, str) and value in PRESETS:
            found.append(PRESETS[value][0])
        elif isinstance(value, dict):
            if value.get("source") in PRESETS:
                found.append(PRESETS[value["source"]][0])
            path = value.get("path")
            if isinstance(path, str) and path not in DATASET_BUILDERS and hub_repo_id(path):
                found.append(path)
            for inner in value.values():
                if isinstance(inner, dict):
                    visit(inner)
        return found

    options = (recipe.get("data") or {}).get("options") or {}
    visit(options)
    for value in options.values():
        visit(value)
    return sorted(set(found))


def eval_results(model_name: str, task: str, datasets: list[str], summary: dict):
    """model-index entries: accuracy and perplexity of the final evaluation per number of segments."""
    results = []
    for segments, metrics in sorted(summary.get("eval", {}).items(),
                                    key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)):
        what = f"{segments} segment(s)" if segments.isdigit() else "held-out split"
        for metric in ("accuracy", "perplexity"):
            value = metrics.get(metric)
            if value is None or not math.isfinite(value):
                continue
            results.append(EvalResult(task_type="text-generation", dataset_type=datasets[0] if datasets else task,
                                      dataset_name=f"{task} ({what})", metric_type=metric,
                                      metric_value=round(float(value), 4), dataset_config=segments))
    return results or None


def _results_table(summary: dict) -> str:
    rows = summary.get("eval") or {}
    if not rows:
        return f"No evaluation was recorded with this model (`{RUN_SUMMARY_FILE}` of its training run).\n"
    baseline = (summary.get("baseline") or {}).get("eval") or {}
    head = "| segments | accuracy | loss | perplexity |" + (" accuracy without memory |" if baseline else "")
    lines = [head, "|---" * (5 if baseline else 4) + "|"]
    for n in sorted(rows, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0)):
        m = rows[n]
        line = f"| {n} | {m['accuracy']:.4f} | {m['loss']:.4f} | {m['perplexity']:.4g} |"
        if baseline:
            line += f" {baseline[n]['accuracy']:.4f} |" if n in baseline else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _hyperparameters(recipe: dict) -> str:
    if not recipe:
        return ""
    training, model = recipe.get("training") or {}, recipe.get("model") or {}
    stages = (recipe.get("curriculum") or {}).get("stages") or []
    rows = {"backbone": model.get("name_or_path"), "quantization": model.get("quantization") or "none",
            "dtype": model.get("dtype"), "LoRA": json.dumps(recipe.get("lora")),
            "task": (recipe.get("data") or {}).get("task"),
            "curriculum (segments x steps)": ", ".join(f"{s.get('num_segments')} x {s.get('max_steps')}"
                                                       for s in stages)}
    for key in ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_grad_norm", "bf16", "seed", "deepspeed"):
        if key in training:
            rows[key] = training[key]
    table = "\n".join(f"| {k} | `{v}` |" for k, v in rows.items() if v is not None)
    return (f"## Training\n\n| hyper-parameter | value |\n|---|---|\n{table}\n\n"
            f"<details><summary>The whole recipe (<code>rmt-peft train {RUN_RECIPE_FILE}</code>)</summary>\n\n"
            f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n</details>\n\n")


DEFAULT_LICENSE = "apache-2.0"  # rmt-peft's own: for weights built from a config (tiny:<arch>)


def base_license(base: str | None) -> str | None:
    """The license in the card of the base model: a local folder's README.md, or a Hub model's
    card in the local cache (never downloaded); None when it cannot be read here."""
    if not base:
        return None
    path = os.path.join(base, CARD_FILE) if os.path.isdir(base) else None
    if path is None and hub_repo_id(base):
        cached = huggingface_hub.try_to_load_from_cache(base, CARD_FILE)
        path = cached if isinstance(cached, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # a card without or with broken metadata: the license is unknown, not an error
        return None


def write_model_card(folder: str, repo_id: str | None = None, run_dir: str | None = None) -> str:
    """Write README.md for a saved ``folder`` through ``huggingface_hub.ModelCard``: Hub metadata
    (base_model when it is a Hub repo id, datasets, tags, model-index with the evaluation of the
    training run in ``run_dir``), results, hyper-parameters, memory settings and usage code."""
    kind = folder_kind(folder)
    memory_config, _, metadata = read_memory(folder)
    recipe, summary = read_run(run_dir)
    base = metadata.get("base_model") or None
    quantization = metadata.get("quantization", "none")
    tags = ["rmt-peft", "recurrent-memory-transformer", "long-context", "text-generation"]
    tags += ["lora"] if kind == "lora" else []
    tags += [quantization] if quantization != "none" else []
    folder_name = os.path.basename(os.path.abspath(folder)).split(".tmp-")[0].lstrip(".")
    if folder_name == FINAL_DIR and run_dir:  # a run's final/: the run is what the user named
        folder_name = os.path.basename(os.path.abspath(run_dir))
    name = repo_id or folder_name
    task = (recipe.get("data") or {}).get("task")
    datasets = recipe_datasets(recipe) if recipe else []
    hub_base = hub_repo_id(base)
    found_license = base_license(base)
    license = found_license or (DEFAULT_LICENSE if base and base.startswith(TINY_PREFIX) else "other")
    data = ModelCardData(base_model=hub_base, datasets=datasets or None, model_name=name, license=license,
                         eval_results=eval_results(name, task, datasets, summary) if task else None,
                         library_name="peft" if kind == "lora" else "transformers", tags=tags,
                         pipeline_tag="text-generation")
    options = json.loads(metadata.get("quantization_options") or "{}")
    load_quant = "".join(f", {k}={v!r}" for k, v in {"quantization": quantization, **options}.items()
                         if quantization != "none").replace("'", '"')
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in memory_config.to_dict().items())
    what = ("LoRA adapter (standard PEFT files) plus the trained memory" if kind == "lora"
            else "full model weights plus the trained memory")
    library = "torch" if options.get("quantization_backend") == "torch" else "bitsandbytes"
    trained_on = (f"a {quantization} ({library}) copy of `{base}`" if quantization != "none" and base
                  else f"`{base}`" if base else "its backbone")
    if found_license:
        license_line = f"License: `{license}`, the license of the base model `{base}`."
    elif license == DEFAULT_LICENSE:
        license_line = (f"License: `{license}` (rmt-peft's own): `{base}` is a small model built from a config with "
                        f"random weights, not a published model.")
    else:
        license_line = (f"License: the license of the base model{f' `{base}`' if base else ''} applies to these "
                        f"weights; its card could not be read where this card was written, so the metadata says "
                        f"`other`: set it before sharing.")
    base_hint = ("" if hub_base or kind != "lora" else
                 "# the base is not a Hub model: where it is not at its recorded path, add base_model=PATH\n")
    peft_note = ("\n`peft.PeftModel.from_pretrained(base_model, path)` loads the LoRA part alone "
                 "(without the memory, the model does not read long inputs).\n" if kind == "lora" else
                 "\n`transformers.AutoModelForCausalLM.from_pretrained(path)` loads these weights alone: it ignores "
                 f"the memory (`{MEMORY_WEIGHTS_FILE}`) and reads one context window like the base model. Load "
                 "the model with `RMTModel.from_pretrained` to read long inputs through the memory.\n")
    model_id = repo_id or f"path/to/{name}"  # a repo id once pushed; until then the folder
    data_line = f" on the `{task}` task" + (f" ({', '.join(datasets)})" if datasets else "") if task else ""
    files = ", ".join(f"`{n}`" for n in sorted(set(os.listdir(folder)) | {CARD_FILE}))
    body = f"""
# {name}

A Recurrent Memory Transformer (Bulatov et al., [arXiv 2304.11062](https://arxiv.org/abs/2304.11062))
trained with rmt-peft{data_line} on {trained_on}: {what}.
The input is read in segments of {memory_config.segment_size} tokens; {memory_config.num_memory_tokens}
memory tokens carry what was read from one segment to the next, so inputs may be longer than the
backbone's context.

{license_line}

## Results

Final evaluation of the training run, by input length in segments:

{_results_table(summary)}
{_hyperparameters(recipe)}## Memory settings

| setting | value |
|---|---|
{settings}
| backbone | `{metadata.get('model_type')}`, hidden size {metadata.get('hidden_size')} |
| trained with quantization | {quantization} |

## How to use

```python
import torch
from rmt_peft import RMTModel

{base_hint}rmt = RMTModel.from_pretrained("{model_id}"{load_quant})
input_ids = torch.tensor([[...]])  # token ids of any length; the model reads them segment by segment
out = rmt(input_ids)
new_tokens = rmt.generate(input_ids, max_new_tokens=32)
```
{peft_note}
Files: {files}.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")  # parses and checks the metadata
    path = os.path.join(folder, CARD_FILE)
    card.save(path)
    return path
