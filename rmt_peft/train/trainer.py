"""The training engine: a recipe in, an adapter and a summary out, on Hugging Face's Trainer.

``RMTTrainer`` is a thin ``transformers.Trainer`` subclass: the loss is the RMTModel's,
evaluation adds exact-match accuracy, and saving writes only what trains (the adapter through
``rmt.save_pretrained``, never the frozen backbone; under ZeRO-3 the trainable parameters are
gathered first so the adapter is not empty). Gradient accumulation, bf16, logging
(tensorboard by default), evaluation during training, checkpoints and DeepSpeed are the
Trainer's own. ``train_recipe`` runs the curriculum: one Trainer per stage on the same model, so
each stage starts from the previous stage's weights with a fresh optimizer and schedule.

Run folder: ``stage-<k>/`` (checkpoints, see curriculum.py), ``final/`` (adapter),
``summary.json`` (final evaluation per number of segments), ``recipe.yaml`` (resolved recipe).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, Dataset
from transformers import Trainer, TrainingArguments

from .curriculum import (END_DIR, CurriculumState, ResumePoint, StageCallback, find_resume_point, stage_budget,
                         stage_dir)
from .recipe import TINY_PREFIX, Recipe, RecipeError, needs_tokenizer, stage_segments

TRAINABLE_FILE = "trainable.safetensors"
MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


# -- building -------------------------------------------------------------------------------
def build_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, or None for token-level tasks on tiny models."""
    name = recipe.model.tokenizer
    if name is None and recipe.model.is_tiny:
        name = "offline" if needs_tokenizer(recipe) else None
    if name is None and not recipe.model.is_tiny:
        name = recipe.model.name_or_path
    if name is None:
        return None
    if name == "offline":
        from ..data.tokenizer import offline_tokenizer

        return offline_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def gathered(params):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every rank (a no-op otherwise)."""
    import contextlib

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def embedding_std(causal_lm) -> float:
    """Std of the input embedding matrix, computed on the whole matrix even under ZeRO-3."""
    weight = causal_lm.get_input_embeddings().weight
    with gathered([weight]):
        return float(weight.detach().float().std())


def build_backbone(recipe: Recipe, seed: int):
    model = recipe.model
    if model.is_tiny:
        from ..tiny_models import tiny_model

        return tiny_model(model.name_or_path[len(TINY_PREFIX):], seed=seed, **model.config)
    from ..backbones import load_backbone

    kwargs = {}
    if model.quantization == "4bit" and recipe.zero_stage == 3:
        kwargs["quant_storage"] = model.dtype  # ZeRO-3 partitions 4-bit storage only in the compute dtype
    return load_backbone(model.name_or_path, quantization=model.quantization, dtype=model.dtype,
                         attn_implementation=model.attention, speedups=model.speedups, **kwargs)


def build_model(recipe: Recipe, seed: int):
    """Backbone (+ LoRA) wrapped in an RMTModel, in training mode."""
    from ..attention import use_gpt_neo_sdpa
    from ..recurrent import RMTModel
    from ..speedups import cache_dequantized_weights

    backbone = build_backbone(recipe, seed)
    memory = recipe.memory
    if memory.memory_init_std is None and memory.num_memory_tokens:
        # RMTModel would take the std of a ZeRO-3 partition (an empty tensor): gather it here.
        memory = dataclasses.replace(memory, memory_init_std=embedding_std(backbone))
    torch.manual_seed(seed)
    # lora null: full fine-tuning (small models); quantized backbones arrive frozen either way.
    compile = (recipe.model.compile_mode or True) if recipe.model.compiles_blocks else False
    rmt = RMTModel.from_backbone(backbone, memory, lora=recipe.lora, speedups=recipe.model.speedups,
                                 compile=compile)
    if recipe.model.attention == "eager":  # asked for by name: keep it (from_backbone switches GPT-Neo to SDPA)
        use_gpt_neo_sdpa(rmt.causal_lm, enable=False)
    if recipe.model.cache_dequantized_weights:
        cache_dequantized_weights(rmt.causal_lm)
    if any(recipe.training.get(k) for k in CHECKPOINTING_KEYS):
        # Non-reentrant only: BPTT reuses the LoRA weights in every segment. Under ZeRO-3 the
        # recompute sees the frozen weights re-partitioned (shape [0]) until DeepSpeed's
        # pre-backward hook gathers them again for the gradient, so torch's metadata check
        # (not the gradients) would fail; DeepSpeed #8148 / transformers #47254.
        kwargs = {"use_reentrant": False}
        if recipe.zero_stage == 3:
            kwargs["determinism_check"] = "none"
        enable = getattr(rmt.causal_lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            rmt.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return rmt.train()


def build_dataset(recipe: Recipe, tokenizer, segments: list[int], num_samples: int, seed: int) -> Dataset:
    """Samples of every count in ``segments`` (num_samples split evenly), for one stage."""
    from ..data.registry import build_dataset as registry_build

    parts = []
    for i, n in enumerate(segments):
        count = max(1, num_samples // len(segments))
        ds = registry_build(recipe.data.task, recipe.data.options, tokenizer=tokenizer,
                            segment_size=recipe.memory.segment_size, num_segments=n,
                            num_samples=count, seed=seed * 1000 + n)
        if len(ds) == 0:
            raise RecipeError(f"data.task={recipe.data.task!r} with {n} segments produced no usable samples; "
                              f"check data.options")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


@dataclasses.dataclass
class Collator:
    """Pads a batch (``rmt_peft.data.collate``) and keeps only what RMTModel.forward takes."""

    pad_token_id: int = 0
    padding_side: str = "right"

    def __call__(self, samples):
        from ..data.collate import collate

        samples = [{k: s[k] for k in MODEL_INPUTS if k in s} for s in samples]
        return collate(samples, pad_token_id=self.pad_token_id, padding_side=self.padding_side)


# -- saving ---------------------------------------------------------------------------------
def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, folder: str, base_model: str, should_save: bool = True) -> None:
    """The adapter (rmt.save_pretrained) + the trainable tensors by parameter name, for an exact
    resume. Called on every rank: under ZeRO-3 gathering the parameters is a collective."""
    params = trainable_parameters(model)
    with gathered(params.values()):
        if should_save:
            model.save_pretrained(folder, base_model=base_model)
            tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
            if sum(t.numel() for t in tensors.values()) == 0:  # e.g. ZeRO-3 partitions saved ungathered
                raise RuntimeError(f"refusing to save an empty adapter to {folder}")
            save_file(tensors, os.path.join(folder, TRAINABLE_FILE))


def load_trainable(model, folder: str) -> None:
    """Load the trainable tensors saved by ``save_adapter`` into ``model`` (names must match)."""
    path = os.path.join(folder, TRAINABLE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no {TRAINABLE_FILE}: not a checkpoint of rmt-peft train")
    tensors = load_file(path)
    params = trainable_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with gathered(params.values()), torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


class RMTTrainerMixin:
    """What an RMTModel changes in a Trainer (transformers' or trl's SFTTrainer): its loss on the
    inputs it takes, exact-match accuracy in evaluation, adapter-only saves and loads."""

    base_model: str = ""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss and per-sample exact match (every labelled token predicted greedily)."""
        from ..eval.metrics import exact_match

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            out = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, return_logits=True)
        correct = exact_match(out.logits, inputs["labels"])[:, None]
        return out.loss.detach(), correct, correct

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_adapter(self.model, output_dir or self.args.output_dir, self.base_model, self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_trainable(model or self.model, resume_from_checkpoint)


class RMTTrainer(RMTTrainerMixin, Trainer):
    """transformers.Trainer for an RMTModel on tokenized datasets (the data registry's)."""

    def __init__(self, *args, base_model: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.base_model = base_model


def sft_trainer_class():
    """trl's SFTTrainer for an RMTModel: trl formats prompt/completion and chat datasets (chat
    template, completion-only or assistant-only loss masks, truncation); the model is ours."""
    from trl import SFTTrainer

    class RMTSFTTrainer(RMTTrainerMixin, SFTTrainer):
        def __init__(self, *args, base_model: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.base_model = base_model

    return RMTSFTTrainer


def accuracy_metrics(prediction) -> dict[str, float]:
    return {"accuracy": float(prediction.predictions.mean())}


# -- running --------------------------------------------------------------------------------
def distributed_cpu_deepspeed(training: dict) -> bool:
    """True when DeepSpeed runs on CPU ranks (gloo) under a launcher."""
    return bool(training.get("deepspeed")) and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ


def training_arguments(recipe: Recipe, output_dir: str, max_steps: int, seed: int,
                       max_segments: int = 1) -> TrainingArguments:
    """The stage's TrainingArguments (SFTConfig for trl: inputs truncated to the stage's segments)."""
    kwargs = {k: v for k, v in recipe.training.items() if k != "resume_from_checkpoint"}
    for key in CHECKPOINTING_KEYS:  # enabled on the backbone by build_model, not by the Trainer
        kwargs[key] = False  # (SFTConfig would default it to true)
        kwargs.pop(f"{key}_kwargs", None)
    kwargs.update(output_dir=output_dir, max_steps=max_steps, seed=seed, remove_unused_columns=False)
    kwargs.setdefault("report_to", "tensorboard")
    if not torch.cuda.is_available() and not kwargs.get("deepspeed"):
        kwargs["use_cpu"] = True
    if distributed_cpu_deepspeed(kwargs):
        # Accelerate only sets DeepSpeed up on accelerators; on CPU ranks we configure the
        # process group (gloo) first and let the Trainer use it.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        os.environ.pop("ACCELERATE_USE_DEEPSPEED")
        kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    config_class = TrainingArguments
    if recipe.trainer == "sft":
        from trl import SFTConfig

        config_class = SFTConfig
        kwargs["max_length"] = max_segments * recipe.memory.segment_size
    try:
        return config_class(**kwargs)
    except ValueError as err:
        raise RecipeError(f"training: {err}") from err


def release_deepspeed(trainer: Trainer | None) -> None:
    """Let a finished stage's DeepSpeed engine go (its hooks and accelerate's DeepSpeed state), so
    the next stage's Trainer sets up its own engine on the same, still partitioned, weights."""
    if trainer is None or not trainer.is_deepspeed_enabled:
        return
    from accelerate.state import AcceleratorState

    trainer.model_wrapped.destroy()
    trainer.accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)


def write_recipe(recipe: Recipe, args: TrainingArguments) -> None:
    """OUTPUT_DIR/recipe.yaml, once every rank has checked the folder (hence the barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if args.should_save:
        os.makedirs(recipe.output_dir, exist_ok=True)
        with open(os.path.join(recipe.output_dir, "recipe.yaml"), "w") as f:
            f.write(recipe.to_yaml())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(recipe: Recipe, resume: bool) -> None:
    out = recipe.output_dir
    if resume:
        if not os.path.exists(os.path.join(out, "recipe.yaml")):
            raise RecipeError(f"training.resume_from_checkpoint is set but {out!r} holds no run to resume")
        return
    if os.path.isdir(out) and os.listdir(out):
        raise RecipeError(f"training.output_dir={out!r} already holds files (another run?); nothing is "
                          f"overwritten: choose a new output_dir, resume with training.resume_from_checkpoint=true, "
                          f"or delete the folder")


def final_segments(recipe: Recipe) -> list[int]:
    if recipe.eval.num_segments:
        return list(recipe.eval.num_segments)
    return sorted({n for s in recipe.curriculum.stages for n in stage_segments(s)})


def train_recipe(recipe: Recipe, log=print) -> dict:
    """Run the recipe's curriculum, save ``final/``, evaluate, write ``summary.json``."""
    resume = recipe.training.get("resume_from_checkpoint")
    check_output_dir(recipe, bool(resume))  # on every rank, before any rank writes
    out = recipe.output_dir

    base_seed = int(recipe.training.get("seed", 42))
    stages = recipe.curriculum.stages
    point = None
    if isinstance(resume, str):  # a given checkpoint (or a stage's end/ folder)
        point = ResumePoint(state=CurriculumState.load(resume), **{
            "weights" if os.path.basename(os.path.normpath(resume)) == END_DIR else "checkpoint": resume})
    elif resume:
        point = find_resume_point(out, len(stages))
    state = point.state if point else CurriculumState()

    total = recipe.training.get("max_steps")
    model = collator = tokenizer = trainer = None

    def prepare(args):
        """Build the model once the first TrainingArguments exist: under ZeRO-3 they make
        transformers partition the backbone while it loads (deepspeed.zero.Init)."""
        nonlocal model, collator, tokenizer
        write_recipe(recipe, args)
        model = build_model(recipe, base_seed)
        if point and point.weights:
            load_trainable(model, point.weights)
        tokenizer = build_tokenizer(recipe)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None) or 0
        collator = Collator(pad, recipe.data.padding_side)

    for index in range(state.stage, len(stages)):
        stage = stages[index]
        budget = stage_budget(stage, state.steps_before, total)
        if budget == 0:
            log(f"stage {index}: no steps left under training.max_steps={total}; stopping the curriculum")
            break
        segments = stage_segments(stage)
        log(f"stage {index}: {segments} segment(s), up to {budget} steps")
        release_deepspeed(trainer)
        args = training_arguments(recipe, stage_dir(out, index), budget, base_seed + index, max(segments))
        if model is None:
            prepare(args)
        trainer = stage_trainer(recipe, model, args, tokenizer, collator, segments, StageCallback(stage, state))
        checkpoint = point.checkpoint if point and index == point.state.stage else None
        result = trainer.train(resume_from_checkpoint=checkpoint)
        steps = trainer.state.global_step
        state.finished.append({"stage": index, "num_segments": stage.num_segments, "steps": steps,
                               "train_loss": result.training_loss,
                               "reason": state.stop_reason or f"step budget ({budget})"})
        state.stage, state.steps_before = index + 1, state.steps_before + steps
        state.best, state.bad_evals, state.stop_reason = None, 0, None
        end = os.path.join(stage_dir(out, index), END_DIR)
        trainer.save_model(end)
        if trainer.args.should_save:
            state.save(end)

    if trainer is None:  # nothing left to train (resumed after the last stage): evaluate what was trained
        segments = final_segments(recipe)
        args = training_arguments(recipe, stage_dir(out, len(stages)), 1, base_seed, max(segments))
        prepare(args)
        trainer = stage_trainer(recipe, model, args, tokenizer, collator, segments, None)
    trainer.save_model(os.path.join(out, "final"))

    evaluation = {}
    if recipe.trainer == "sft":  # trl prepared (and truncated) the eval split with the last stage
        metrics = trainer.evaluate(metric_key_prefix="final")
        evaluation["all"] = {"accuracy": metrics["final_accuracy"], "loss": metrics["final_loss"],
                             "perplexity": math.exp(metrics["final_loss"]) if metrics["final_loss"] < 50 else float("inf")}
    for n in final_segments(recipe) if recipe.trainer == "rmt" else []:
        ds = build_dataset(recipe, tokenizer, [n], recipe.eval.num_samples or recipe.data.num_eval_samples,
                           recipe.data.seed + 2)
        metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"final_{n}")
        loss = metrics[f"final_{n}_loss"]
        evaluation[str(n)] = {"accuracy": metrics[f"final_{n}_accuracy"], "loss": loss,
                              "perplexity": math.exp(loss) if loss < 50 else float("inf")}
    summary = {"num_memory_tokens": recipe.memory.num_memory_tokens, "segment_size": recipe.memory.segment_size,
               "stages": state.finished, "eval": evaluation}
    if trainer.args.should_save:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    # A later run in this process (the baseline of eval.baseline) builds its own Trainer, which
    # accelerate refuses while this one's DeepSpeed state is alive.
    release_deepspeed(trainer)
    return summary


def stage_trainer(recipe: Recipe, model, args, tokenizer, collator, segments: list[int], callback):
    """The Trainer of one stage: RMTTrainer on the registry's samples of ``segments`` segments, or
    trl's SFTTrainer on an instruction dataset (truncated by ``args.max_length``)."""
    callbacks = [callback] if callback else None
    if recipe.trainer == "sft":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        train_ds, eval_ds = instruction_datasets(recipe)
        if tokenizer.pad_token_id is None:  # trl's convention
            tokenizer.pad_token = tokenizer.eos_token
        # trl's own collator (its masks come from its dataset preparation), given explicitly so trl
        # does not write the pad token into a generation_config our wrapper does not have.
        sft_collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                                       pad_to_multiple_of=args.pad_to_multiple_of)
        trainer = sft_trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                      processing_class=tokenizer, data_collator=sft_collator,
                                      compute_metrics=accuracy_metrics, callbacks=callbacks,
                                      base_model=recipe.model.name_or_path)
        if len(trainer.train_dataset) == 0:
            raise RecipeError(f"data.options={recipe.data.options!r}: no usable rows once truncated to "
                              f"{args.max_length} tokens ({max(segments)} segment(s)): trl drops samples whose "
                              f"completion is cut away; start the curriculum with more segments")
        return trainer
    train_ds = build_dataset(recipe, tokenizer, segments, recipe.data.num_train_samples, recipe.data.seed)
    eval_ds = None
    if args.eval_strategy != "no":
        eval_ds = build_dataset(recipe, tokenizer, segments, recipe.data.num_eval_samples, recipe.data.seed + 1)
    return RMTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                      compute_metrics=accuracy_metrics, callbacks=callbacks, base_model=recipe.model.name_or_path)


def instruction_datasets(recipe: Recipe):
    """Train and eval splits of an instruction dataset (``datasets.load_dataset`` arguments in
    data.options; trl's prompt/completion or messages columns)."""
    from datasets import load_dataset

    options = dict(recipe.data.options)
    eval_split = options.pop("eval_split", None)
    split = options.pop("split", "train")
    train = load_dataset(split=split, **options)
    if len(train) == 0:
        raise RecipeError(f"data.options={recipe.data.options!r}: the {split!r} split has no rows")
    train = train.select(range(min(len(train), recipe.data.num_train_samples)))
    held_out = load_dataset(split=eval_split, **options) if eval_split else train
    return train, held_out.select(range(min(len(held_out), recipe.data.num_eval_samples)))


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The same run with 0 memory tokens (segments processed independently), in OUTPUT_DIR/baseline."""
    training = {**recipe.training, "output_dir": os.path.join(recipe.output_dir, "baseline")}
    return dataclasses.replace(recipe, memory=dataclasses.replace(recipe.memory, num_memory_tokens=0),
                               training=training, eval=dataclasses.replace(recipe.eval, baseline=False))


def run(recipe: Recipe, log=print) -> dict:
    """``train_recipe``, plus the 0-memory baseline when ``eval.baseline`` asks; the combined
    accuracy table is printed and written to summary.json."""
    summary = train_recipe(recipe, log)
    if recipe.eval.baseline:
        base = train_recipe(baseline_recipe(recipe), log)
        summary["baseline"] = base
        summary["accuracy"] = {"memory": {n: m["accuracy"] for n, m in summary["eval"].items()},
                               "baseline": {n: m["accuracy"] for n, m in base["eval"].items()}}
        if is_main_process():
            with open(os.path.join(recipe.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    if is_main_process():
        log(format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    rows = sorted(summary["eval"], key=lambda n: int(n) if n.isdigit() else 1 << 30)  # "all": trl's eval split
    base = summary.get("baseline", {}).get("eval", {})
    m = summary["num_memory_tokens"]
    header = f"{'segments':>8} | {f'accuracy ({m} memory)':>22}" + (f" | {'accuracy (0 memory)':>20}" if base else "")
    lines = [header, "-" * len(header)]
    for n in rows:
        line = f"{n:>8} | {summary['eval'][n]['accuracy']:>22.3f}"
        if base:
            line += f" | {base[n]['accuracy']:>20.3f}"
        lines.append(line)
    return "\n".join(lines)
