"""The model card (README.md) of a saved folder, written through ``huggingface_hub.ModelCard``: Hub
metadata (base_model when it is a Hub repo id, the license, datasets, tags, model-index), the
results and hyper-parameters of the training run the folder came from (read through
``rmt_peft.runs``), the memory settings and usage code. ``RMTModel.save_pretrained`` writes one
without a run; training and export write it again with the run.
"""
from __future__ import annotations

import json
import math
import os

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import hub, runs
from .data.registry import hub_datasets
from .fileio import TEMP_MARK
from .saving import CARD_FILE, MEMORY_WEIGHTS_FILE, folder_kind, read_memory
from .tiny_models import TINY_PREFIX

DEFAULT_LICENSE = "apache-2.0"  # rmt-peft's own: for weights built from a config (tiny:<arch>)


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
        return f"No evaluation was recorded with this model (`{runs.RUN_SUMMARY_FILE}` of its training run).\n"
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
            f"<details><summary>The whole recipe (<code>rmt-peft train {runs.RUN_RECIPE_FILE}</code>)</summary>\n\n"
            f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n</details>\n\n")


def base_license(base: str | None) -> str | None:
    """The license in the card of the base model: a local folder's README.md, or a Hub model's
    card in the local cache (never downloaded); None when it cannot be read here."""
    path = hub.cached_card(base)
    if path is None:
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # a card without or with broken metadata: the license is unknown, not an error
        return None


def license_of(base: str | None) -> tuple[str, str]:
    """(the card's license, the line that explains it): the base model's, rmt-peft's own for a model
    built from a config, else ``other`` with a line saying the base model's license applies."""
    found = base_license(base)
    if found:
        return found, f"License: `{found}`, the license of the base model `{base}`."
    if base and base.startswith(TINY_PREFIX):
        return DEFAULT_LICENSE, (f"License: `{DEFAULT_LICENSE}` (rmt-peft's own): `{base}` is a small model built "
                                 f"from a config with random weights, not a published model.")
    return "other", (f"License: the license of the base model{f' `{base}`' if base else ''} applies to these "
                     f"weights; its card could not be read where this card was written, so the metadata says "
                     f"`other`: set it before sharing.")


def how_to_use(kind: str, model_id: str, hub_base: str | None, load_quant: str) -> str:
    """The card's usage section: loading code (``model_id``: a repo id once pushed, until then the
    folder) and what peft or transformers alone load from the folder."""
    base_hint = ("" if hub_base or kind != "lora" else
                 "# the base is not a Hub model: where it is not at its recorded path, add base_model=PATH\n")
    alone = ("\n`peft.PeftModel.from_pretrained(base_model, path)` loads the LoRA part alone "
             "(without the memory, the model does not read long inputs).\n" if kind == "lora" else
             "\n`transformers.AutoModelForCausalLM.from_pretrained(path)` loads these weights alone: it ignores "
             f"the memory (`{MEMORY_WEIGHTS_FILE}`) and reads one context window like the base model. Load "
             "the model with `RMTModel.from_pretrained` to read long inputs through the memory.\n")
    return f"""## How to use

```python
import torch
from rmt_peft import RMTModel

{base_hint}rmt = RMTModel.from_pretrained("{model_id}"{load_quant})
input_ids = torch.tensor([[...]])  # token ids of any length; the model reads them segment by segment
out = rmt(input_ids)
new_tokens = rmt.generate(input_ids, max_new_tokens=32)
```
{alone}"""


def write_model_card(folder: str, repo_id: str | None = None, run_dir: str | None = None) -> str:
    """Write README.md for a saved ``folder`` through ``huggingface_hub.ModelCard``: Hub metadata
    (base_model when it is a Hub repo id, datasets, tags, model-index with the evaluation of the
    training run in ``run_dir``), results, hyper-parameters, memory settings and usage code."""
    kind = folder_kind(folder)
    memory_config, _, metadata = read_memory(folder)
    recipe, summary = runs.read_run(run_dir)
    base = metadata.get("base_model") or None
    quantization = metadata.get("quantization", "none")
    tags = ["rmt-peft", "recurrent-memory-transformer", "long-context", "text-generation"]
    tags += ["lora"] if kind == "lora" else []
    tags += [quantization] if quantization != "none" else []
    folder_name = os.path.basename(os.path.abspath(folder)).split(TEMP_MARK)[0].lstrip(".")
    if folder_name == runs.FINAL_DIR and run_dir:  # a run's final/: the run is what the user named
        folder_name = os.path.basename(os.path.abspath(run_dir))
    name = repo_id or folder_name
    task = (recipe.get("data") or {}).get("task")
    datasets = hub_datasets((recipe.get("data") or {}).get("options") or {}) if recipe else []
    hub_base = hub.hub_repo_id(base)
    license, license_line = license_of(base)
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

{how_to_use(kind, repo_id or f"path/to/{name}", hub_base, load_quant)}
Files: {files}.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")  # parses and checks the metadata
    path = os.path.join(folder, CARD_FILE)
    card.save(path)
    return path

