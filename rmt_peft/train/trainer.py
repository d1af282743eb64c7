"""The training engine: a recipe in, an adapter and a summary out, on Hugging Face's Trainer.

``RMTTrainer`` is a thin ``transformers.Trainer`` subclass: the loss is the RMTModel's,
evaluation adds exact-match accuracy, and saving writes only what trains (the adapter through
``rmt.save_pretrained``, never the frozen backbone; under ZeRO-3 the trainable parameters are
gathered first so the adapter is not empty). Gradient accumulation, bf16, logging
(tensorboard by default), evaluation during training, checkpoints and DeepSpeed are the
Trainer's own. ``train_recipe`` runs the curriculum: one Trainer per stage on the same model, so
each stage starts from the previous stage's weights with a fresh optimizer and schedule.

Run folder: ``stage-<k>/`` (checkpoints, see curriculum.py), ``final/`` (adapter),
``summary.json`` (``status``, the stages, final evaluation per number of segments),
``recipe.yaml`` (resolved recipe), ``.rmt-peft.lock`` while a run owns the folder (lock.py).
Every file is written atomically (fileio.py); a resume continues exactly where the run stopped,
in any stage; the divergence guard (guard.py) checks every optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
import os
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, Dataset
from transformers import Trainer, TrainingArguments

from ..attention import use_gpt_neo_sdpa
from ..backbones import DTYPES, enable_checkpointing, load_backbone
from ..data.collate import collate
from ..data.registry import build_dataset as registry_build
from ..env import versions
from ..errors import TrainingDiverged, UserError
from ..fileio import atomic_path, disk_error, remove_temp_files
from ..hub import write_model_card
from ..log import is_main_process, logger, trainer_output
from ..inputs import IGNORE_INDEX
from ..metrics import exact_match
from ..recurrent import RMTModel, context_split
from .. import runs
from ..loading import load_tokenizer, tokenizer_name
from ..runs import TRAINABLE_FILE
from ..tiny_models import tiny_model
from .curriculum import CurriculumState, StageCallback, stage_budget, stage_memory
from .guard import DivergenceGuard, set_base_learning_rate
from .keep_best import Kept, KeepBest
from .lock import RunLock
from ..recipe import TINY_PREFIX, ZERO3_NO_COMPILE, Recipe, RecipeError, needs_tokenizer, stage_segments
from .tracking import continue_curve, end_run, final_evaluation, log_final_evaluation

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")
TORCH_SAVE_FAILURES = ("unexpected pos", "file write failed", "No space left")  # torch.save's zip writer


# -- building -------------------------------------------------------------------------------
def build_tokenizer(recipe: Recipe):
    """The recipe's tokenizer (``runs.tokenizer_name``), or None for token-level tasks on tiny models."""
    if recipe.model.tokenizer is None and recipe.model.is_tiny and not needs_tokenizer(recipe):
        return None
    name = tokenizer_name(recipe)
    with not_found_is_user_error("model.tokenizer", name):
        return load_tokenizer(name)


@contextlib.contextmanager
def not_found_is_user_error(key: str, name: str):
    """A model or tokenizer that cannot be found (a typo, or a Hub id not cached while offline)
    is a mistake in the recipe: one line naming the key, not a traceback."""
    try:
        yield
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (offline: HF_HUB_OFFLINE is set and it is not in the cache)" if os.environ.get(
            "HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise UserError(f"{key}={name!r} could not be loaded{offline}: {reason}") from err


def gathered(params):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every rank (a no-op otherwise)."""
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
    if model.is_tiny:  # built in fp32 from a config, then in model.dtype (a quantization is refused by the recipe)
        backbone = tiny_model(model.name_or_path[len(TINY_PREFIX):], seed=seed, **model.config)
        return backbone.to(DTYPES[model.dtype]) if model.dtype else backbone
    kwargs = {"quantization_backend": model.quantization_backend}
    if model.quantization == "4bit" and recipe.zero_stage == 3:
        kwargs["quant_storage"] = model.dtype  # ZeRO-3 partitions 4-bit storage only in the compute dtype
    if model.quantization_backend == "auto" and model.quantization in ("8bit", "4bit") and (
            recipe.deepspeed_config is not None or model.cache_dequantized_weights):
        # DeepSpeed broadcasts and partitions plain parameters, and the cache copies bitsandbytes' layers
        kwargs["quantization_backend"] = "bitsandbytes"
    with not_found_is_user_error("model.name_or_path", model.name_or_path):
        return load_backbone(model.name_or_path, quantization=model.quantization, dtype=model.dtype,
                             attn_implementation=model.attention, speedups=model.speedups, **kwargs)


def build_model(recipe: Recipe, seed: int):
    """Backbone (+ LoRA) wrapped in an RMTModel, in training mode."""
    backbone = build_backbone(recipe, seed)
    memory = recipe.memory
    if memory.memory_init_std is None and memory.num_memory_tokens:
        # RMTModel would take the std of a ZeRO-3 partition (an empty tensor): gather it here.
        memory = dataclasses.replace(memory, memory_init_std=embedding_std(backbone))
    torch.manual_seed(seed)
    # lora null: full fine-tuning (small models); quantized backbones arrive frozen either way.
    compile = (recipe.model.compile_mode or True) if recipe.compiles_blocks else False
    if recipe.model.compile_blocks is None and recipe.zero_stage == 3 and torch.cuda.is_available():
        logger.info(f"model.compile_blocks: null resolves to off under ZeRO-3 (training.deepspeed): {ZERO3_NO_COMPILE}")
    half = recipe.model.dtype is not None and DTYPES[recipe.model.dtype] in (torch.bfloat16, torch.float16)
    if recipe.zero_stage == 3 and half and recipe.model.quantization is None and not (
            recipe.training.get("bf16") or recipe.training.get("fp16")):
        logger.warning(f"model.dtype={recipe.model.dtype} under ZeRO-3 without training.bf16 (or fp16): transformers "
                       f"partitions the backbone in the DeepSpeed config's dtype, fp32 here, so it is held and "
                       f"computed in fp32 (twice the memory, fp32 matmuls); set training.bf16=true")
    # null: on where it costs little (RMTModel.from_backbone); never under ZeRO-3 (partitioned weights)
    cache = False if recipe.zero_stage == 3 else recipe.model.cache_dequantized_weights
    rmt = RMTModel.from_backbone(backbone, memory, lora=recipe.lora, speedups=recipe.model.speedups,
                                 compile=compile, cache_dequantized=cache, verbose=False)
    logger.info(rmt.trainable_summary())
    if recipe.model.attention == "eager":  # asked for by name: keep it (from_backbone switches GPT-Neo to SDPA)
        use_gpt_neo_sdpa(rmt.causal_lm, enable=False)
    if any(recipe.training.get(k) for k in CHECKPOINTING_KEYS):
        # Non-reentrant only: BPTT reuses the LoRA weights in every segment.
        enable_checkpointing(rmt.causal_lm, zero3=recipe.zero_stage == 3, drop_input_hook=False)
    return rmt.train()


class DataUnavailable(RecipeError):
    """The data source could not be read at all (a Hub dataset while offline, an unreadable file):
    not a source too small for a stage."""


def build_dataset(recipe: Recipe, tokenizer, segments: list[int], num_samples: int, seed: int) -> Dataset:
    """Samples of every count in ``segments`` (num_samples split evenly), for one stage."""
    parts = []
    for i, n in enumerate(segments):
        count = max(1, num_samples // len(segments))
        try:
            ds = registry_build(recipe.data.task, recipe.data.options, tokenizer=tokenizer,
                                segment_size=recipe.memory.segment_size, num_segments=n,
                                num_samples=count, seed=seed * 1000 + n)
        except OSError as err:  # a Hub dataset offline, a file that cannot be read: nothing to build from
            raise DataUnavailable(f"data.task={recipe.data.task!r}: {err}") from err
        except ValueError as err:  # the data readers name the file, line or option
            raise RecipeError(f"data.task={recipe.data.task!r} with {n} segments: {err}") from err
        if len(ds) == 0:
            raise RecipeError(f"data.task={recipe.data.task!r} with {n} segments produced no usable samples; "
                              f"check data.options")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def check_stage_data(recipe: Recipe, tokenizer, first_stage: int = 0) -> None:
    """Build one sample of every input length of the curriculum stages from ``first_stage`` on and
    of the final evaluation, before any training: a data source that cannot fill a later stage
    fails now, naming the stage and the shortfall, instead of after hours of the earlier ones."""
    if recipe.trainer != "rmt":  # trl's trainers prepare (and report on) their own rows
        return
    checks: dict[int, str] = {}  # segments -> the first place that needs them
    for i, stage in enumerate(recipe.curriculum.stages):
        for n in stage_segments(stage) if i >= first_stage else []:
            checks.setdefault(n, f"curriculum stage {i} ({n} segments)")
    for n in final_segments(recipe):
        checks.setdefault(n, f"eval.num_segments ({n} segments)")
    for n, what in checks.items():  # in curriculum order: the first stage that cannot be filled is named
        try:
            build_dataset(recipe, tokenizer, [n], 1, recipe.data.seed)[0]
        except DataUnavailable:
            raise
        except OSError as err:  # a source opened lazily, at the first sample
            raise DataUnavailable(f"data.task={recipe.data.task!r}: {err}") from err
        except (ValueError, IndexError) as err:
            raise RecipeError(f"{what}: data.task={recipe.data.task!r} cannot fill {n} segments of "
                              f"{recipe.memory.segment_size} tokens: {err}") from None


@dataclasses.dataclass
class ResumePoint:
    """Where a run goes on: ``state`` (the stage to run next); ``checkpoint``: a Trainer checkpoint
    inside that stage (or None); ``weights``: the folder to load weights from before the stage
    starts (the previous stage's end)."""

    state: CurriculumState
    checkpoint: str | None = None
    weights: str | None = None


@dataclasses.dataclass
class Collator:
    """Pads a batch (``rmt_peft.data.collate``) and keeps only what RMTModel.forward takes."""

    pad_token_id: int = 0
    padding_side: str = "right"

    def __call__(self, samples):
        samples = [{k: s[k] for k in MODEL_INPUTS if k in s} for s in samples]
        return collate(samples, pad_token_id=self.pad_token_id, padding_side=self.padding_side)


# -- saving ---------------------------------------------------------------------------------
def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, folder: str, base_model: str, should_save: bool = True, for_resume: bool = True) -> None:
    """The adapter (rmt.save_pretrained) + (``for_resume``) the trainable tensors by parameter name,
    for an exact resume. Called on every rank: under ZeRO-3 gathering the parameters is a collective."""
    params = trainable_parameters(model)
    with gathered(params.values()):
        if should_save:
            model.save_pretrained(folder, base_model=base_model)
            tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
            if sum(t.numel() for t in tensors.values()) == 0:  # e.g. ZeRO-3 partitions saved ungathered
                raise RuntimeError(f"refusing to save an empty adapter to {folder}")
            if for_resume:
                with atomic_path(os.path.join(folder, TRAINABLE_FILE)) as tmp:
                    save_file(tensors, tmp)


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
    inputs it takes, exact-match accuracy in evaluation, adapter-only saves and loads, the
    divergence guard's checks before every optimizer step (guard.py)."""

    base_model: str = ""
    guard: DivergenceGuard | None = None
    base_learning_rate: float | None = None  # set by a rollback: replaces the resumed checkpoint's
    _loss_sum: torch.Tensor | None = None  # this Trainer's step losses, summed on the device (no sync a step)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.note_loss(loss)
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        return loss

    def step_loss_sum(self) -> float:
        """The summed losses of the steps this Trainer took (the Trainer's train_loss times its steps)."""
        return float(self._loss_sum) if self._loss_sum is not None else 0.0

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of the step, checked (with the step's losses) before the
        optimizer applies it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.guard is not None:
            self.guard.check_step(grad_norm, self.state.global_step + 1)
        return grad_norm

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint and self.base_learning_rate is not None:
            set_base_learning_rate(self.optimizer, self.lr_scheduler, self.base_learning_rate)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss and per-sample exact match (every labelled token predicted greedily). The segments
        before the one holding the first position to score are only read into memory: memory
        tasks ask at the end, and logits of a whole long input (segments x vocabulary) would not
        fit. The loss and the predictions are those of one forward over the whole input."""
        inputs = self._prepare_inputs(inputs)
        batch = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        rmt = self.accelerator.unwrap_model(model)
        cfg = rmt.memory_config
        with torch.no_grad():
            scored = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()  # logits at t predict t + 1
            length = batch["labels"].shape[1]
            split = context_split(length, int(scored[0]), cfg.segment_size, cfg.segment_alignment) if len(scored) else 0
            memory = None
            if split:
                context = {k: v[:, :split] for k, v in batch.items() if k != "labels"}
                # through the (wrapped) model's call, not rmt.read: ZeRO-3 gathers weights in its hooks
                memory = model(**context, return_logits=False).memory
                batch = {k: v[:, split:] for k, v in batch.items()}
            out = model(**batch, memory=memory, return_logits=True)
        correct = exact_match(out.logits, batch["labels"])[:, None]
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
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in CHECKPOINTING_KEYS:  # enabled on the backbone by build_model, not by the Trainer
        if key in fields:  # activation_checkpointing is new after transformers 5.17
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
        runs.write_recipe(recipe.output_dir, recipe.to_yaml())


def final_segments(recipe: Recipe) -> list[int]:
    if recipe.eval.num_segments:
        return list(recipe.eval.num_segments)
    return sorted({n for s in recipe.curriculum.stages for n in stage_segments(s)})


def with_local_paths_resolved(recipe: Recipe) -> Recipe:
    """``model.name_or_path`` and ``model.tokenizer`` that name local folders, made absolute: the
    run's recipe.yaml and its adapter's recorded base then load from any folder (eval, ask, export)."""
    model = recipe.model
    changes = {key: os.path.abspath(value) for key in ("name_or_path", "tokenizer")
               if (value := getattr(model, key)) and os.path.exists(value) and not os.path.isabs(value)}
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **changes)) if changes else recipe


def train_recipe(recipe: Recipe, log=print) -> dict:
    """Run the recipe's curriculum, save ``final/``, evaluate, write ``summary.json``; the output
    folder is locked for the run (lock.py). Raises TrainingDiverged when the guard stops the run."""
    recipe = with_local_paths_resolved(recipe)
    lock = RunLock(recipe.output_dir) if is_main_process() else None
    try:
        if lock is not None:
            lock.acquire()
        return _train_recipe(recipe, log)
    except (OSError, SafetensorError) as err:  # a full disk or a folder that became read-only while training
        raise disk_error(err, getattr(err, "filename", None) or recipe.output_dir) from err
    except RuntimeError as err:
        if not any(sign in str(err) for sign in TORCH_SAVE_FAILURES):
            raise
        # torch.save (optimizer.pt, ...) reports a full disk as a RuntimeError of its zip writer; the
        # unfinished checkpoint has no curriculum.json, so a resume skips it
        raise UserError(f"writing a checkpoint in {recipe.output_dir} failed ({str(err).splitlines()[0][:120]}); "
                        f"is the disk full? Free some space and resume with "
                        f"training.resume_from_checkpoint=true") from err
    finally:
        if lock is not None:
            lock.release()


def provenance(started: float) -> dict:
    """When the run (this process's part of it) started and ended, its wall time, and the software
    and devices it ran on: what a result needs to be traced or compared."""
    now = time.time()
    return {"started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(now - started, 1), "versions": versions(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def _train_recipe(recipe: Recipe, log) -> dict:
    started = time.time()
    resume = recipe.training.get("resume_from_checkpoint")
    # on every rank, before any rank writes
    if not runs.check_start(recipe.output_dir, bool(resume)) and resume is True:
        resume = None  # a folder a killed first start left: nothing to resume, start afresh
    out = recipe.output_dir
    if is_main_process():
        for path in remove_temp_files(out):
            log(f"removed {path}, left by an interrupted write")

    base_seed = int(recipe.training.get("seed", 42))
    stages = recipe.curriculum.stages
    point = None
    if isinstance(resume, str):  # a given checkpoint (or a stage's end/ folder)
        problem = runs.damage(resume, CurriculumState)
        if problem is not None:
            raise UserError(f"training.resume_from_checkpoint={resume!r}: {problem}")
        point = ResumePoint(state=CurriculumState.load(resume), **{
            "weights" if runs.is_stage_end(resume) else "checkpoint": resume})
    elif resume:
        found = runs.find_resume_point(out, len(stages), log, CurriculumState)
        point = ResumePoint(state=CurriculumState())
        if found is not None:
            point = ResumePoint(state=CurriculumState.load(found), **{
                "weights" if runs.is_stage_end(found) else "checkpoint": found})
    # A copy: the loop below advances `state`, while only the stage the run stopped in resumes
    # from point.checkpoint (the later stages start from the previous stage's end).
    state = copy.deepcopy(point.state) if point else CurriculumState()
    resume_stage = point.state.stage if point and point.checkpoint else None

    total = recipe.training.get("max_steps")
    model = collator = tokenizer = trainer = None
    kept = Kept(runs.read_kept(out)) if recipe.curriculum.keep_best_segments else None

    def prepare(args, weights):
        """Build the model once the first TrainingArguments exist: under ZeRO-3 they make
        transformers partition the backbone while it loads (deepspeed.zero.Init)."""
        nonlocal model, collator, tokenizer
        write_recipe(recipe, args)
        model = build_model(recipe, base_seed)
        if weights:
            load_trainable(model, weights)
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
        log(f"stage {index + 1} of {len(stages)} ({os.path.basename(runs.stage_dir(out, index))}): {segments} "
            f"segment(s), up to {budget} steps")
        checkpoint = point.checkpoint if index == resume_stage else None
        while True:  # once, or again after each rollback of the divergence guard
            release_deepspeed(trainer)
            args = training_arguments(recipe, runs.stage_dir(out, index), budget, base_seed + index, max(segments))
            args.learning_rate *= state.lr_scale
            if model is None:
                prepare(args, point.weights if point else None)
                check_stage_data(recipe, tokenizer, index)
            model.memory_config = stage_memory(model.memory_config, recipe.memory, index,
                                               recipe.curriculum.levers_from_stage)
            stage_callback = StageCallback(stage, state)
            callbacks = [stage_callback]
            keeper = keep_best_callback(recipe, tokenizer, index, state.steps_before, kept)
            if keeper is not None:
                callbacks.append(keeper)
            trainer = stage_trainer(recipe, model, args, tokenizer, collator, segments, callbacks)
            stage_callback.trainer = trainer
            if keeper is not None:
                keeper.trainer = trainer
            continue_curve(trainer, out, state.steps_before, index, segments,  # one curve for all stages
                           sum(f.get("epochs") or 0.0 for f in state.finished))
            trainer_output(trainer)  # log lines on stderr, bars on a terminal only; -q: neither
            trainer.guard = DivergenceGuard(recipe.guard.spike_factor, recipe.guard.spike_steps)
            trainer.base_learning_rate = args.learning_rate if state.lr_scale != 1 else None
            try:
                result = trainer.train(resume_from_checkpoint=checkpoint)
                break
            except TrainingDiverged as err:
                event = {"stage": index, "step": err.step, "reason": err.reason,
                         "learning_rate": finite(args.learning_rate)}
                if trainer.args.should_save:
                    runs.set_aside_suspect_checkpoints(runs.stage_dir(out, index), err.first_bad_step, log)
                if recipe.guard.on_divergence != "rollback" or len(state.rollbacks) >= recipe.guard.max_rollbacks:
                    record_divergence(recipe, state, event, err.first_bad_step)
                    raise
                checkpoint = runs.latest_checkpoint(runs.stage_dir(out, index), log, err.first_bad_step, CurriculumState)
                state.lr_scale *= recipe.guard.rollback_lr_factor
                event["rolled_back_to"] = checkpoint or f"the start of stage {index}"
                state.rollbacks.append(event)
                log(f"warning: {err}; rolling back to {event['rolled_back_to']} with learning rate "
                    f"{args.learning_rate * recipe.guard.rollback_lr_factor:.3g}")
                if checkpoint is not None:
                    saved = CurriculumState.load(checkpoint)
                    state.best, state.bad_evals, state.loss_sum = saved.best, saved.bad_evals, saved.loss_sum
                elif index == 0:
                    model = None  # the stage's start is the initialisation: build it again (same seed)
                    state.loss_sum = 0.0
                else:
                    load_trainable(model, runs.end_dir(out, index - 1))
                    state.best, state.bad_evals, state.loss_sum = None, 0, 0.0
        steps = trainer.state.global_step
        # all the stage's steps: the Trainer's own training_loss covers only those after a resume
        train_loss = stage_callback.loss_sum() / steps if steps else result.training_loss
        state.finished.append({"stage": index, "num_segments": stage.num_segments, "steps": steps,
                               "epochs": finite(trainer.state.epoch), "train_loss": finite(train_loss),
                               "reason": state.stop_reason or f"step budget ({budget})"})
        state.stage, state.steps_before = index + 1, state.steps_before + steps
        state.best, state.bad_evals, state.stop_reason, state.loss_sum = None, 0, None, 0.0
        end = runs.end_dir(out, index)
        trainer.save_model(end)
        if trainer.args.should_save:
            state.save(end)

    if trainer is None:  # nothing left to train (resumed after the last stage): evaluate what was trained
        segments = final_segments(recipe)
        args = training_arguments(recipe, runs.stage_dir(out, len(stages)), 1, base_seed, max(segments))
        prepare(args, point.weights if point else None)
        trainer = stage_trainer(recipe, model, args, tokenizer, collator, segments, None)
    if kept is not None and kept.record is not None:
        load_trainable(trainer.model, runs.best_dir(out))
        best, scores = kept.record, kept.scores
        last = f"; the last weights scored {scores[-1]['accuracy']:.3f}" if scores else ""
        log(f"{runs.FINAL_DIR}/ holds the best weights by accuracy at {best['num_segments']} segments: stage {best['stage']}, "
            f"step {best['step']}, {best['accuracy']:.3f}{last}")
    # final/: what a user loads, not resume state
    save_adapter(trainer.model, runs.final_dir(out), trainer.base_model, trainer.args.should_save, False)

    evaluation = {}
    with final_evaluation(trainer):  # reported once below, not as a scalar per length and metric
        if recipe.trainer == "sft":  # trl prepared (and truncated) the eval split with the last stage
            metrics = trainer.evaluate(metric_key_prefix="final")
            evaluation["all"] = eval_entry(metrics["final_accuracy"], metrics["final_loss"])
        for n in final_segments(recipe) if recipe.trainer == "rmt" else []:
            ds = build_dataset(recipe, tokenizer, [n], recipe.eval.num_samples or recipe.data.num_eval_samples,
                               recipe.data.seed + 2)
            metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"final_{n}")
            evaluation[str(n)] = eval_entry(metrics[f"final_{n}_accuracy"], metrics[f"final_{n}_loss"])
    if trainer.args.should_save:
        log_final_evaluation(trainer.args.report_to, out, evaluation,
                             format_table({"eval": evaluation, "num_memory_tokens": recipe.memory.num_memory_tokens}))
    summary = {"status": "completed", "num_memory_tokens": recipe.memory.num_memory_tokens,
               "segment_size": recipe.memory.segment_size, "stages": state.finished, "rollbacks": state.rollbacks,
               "eval": evaluation, **provenance(started)}
    if kept is not None:
        summary["keep_best"] = {"kept": kept.record, "scores": kept.scores}
    if is_main_process():  # one writer, as in run()
        runs.write_summary(out, summary)
    # A later run in this process (the baseline of eval.baseline) builds its own Trainer, which
    # accelerate refuses while this one's DeepSpeed state is alive.
    release_deepspeed(trainer)
    return summary


def finite(value: float | None) -> float | None:
    """``value``, or None when it is NaN or infinite (JSON has no such numbers)."""
    return value if value is not None and math.isfinite(value) else None


def eval_entry(accuracy: float, loss: float) -> dict:
    return {"accuracy": finite(accuracy), "loss": finite(loss),
            "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 50 else None}


def record_divergence(recipe: Recipe, state: CurriculumState, event: dict, first_bad_step: int) -> None:
    """summary.json of a run the guard stopped: what broke, where, and the last good save."""
    good = runs.latest_checkpoint(runs.stage_dir(recipe.output_dir, event["stage"]), lambda *_: None, first_bad_step,
                                  CurriculumState)
    summary = {"status": "diverged", **event, "last_good_checkpoint": good, "stages": state.finished,
               "rollbacks": state.rollbacks,
               "hint": "resume with training.resume_from_checkpoint=true and a lower training.learning_rate "
                       "(or guard.on_divergence=rollback)"}
    if is_main_process():  # summary.json has one writer, the same process that writes the final one
        runs.write_summary(recipe.output_dir, summary)


def keep_best_callback(recipe: Recipe, tokenizer, index: int, steps_before: int, kept: Kept | None) -> KeepBest | None:
    """curriculum.keep_best_segments' scorer for stage ``index``, or None when the stage keeps none."""
    cur = recipe.curriculum
    first = cur.levers_from_stage if cur.keep_best_from_stage is None else cur.keep_best_from_stage
    if cur.keep_best_segments is None or index < first:
        return None
    # held-out samples: the seed differs from training's (+0), evaluation's (+1) and the final one's (+2)
    data = build_dataset(recipe, tokenizer, [cur.keep_best_segments], cur.keep_best_samples, recipe.data.seed + 3)
    return KeepBest(recipe.output_dir, data, cur.keep_best_segments, index, steps_before, kept)


def stage_trainer(recipe: Recipe, model, args, tokenizer, collator, segments: list[int], callbacks: list | None):
    """The Trainer of one stage: RMTTrainer on the registry's samples of ``segments`` segments, or
    trl's SFTTrainer on an instruction dataset (truncated by ``args.max_length``)."""
    if recipe.trainer == "sft":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        train_ds, eval_ds = instruction_datasets(recipe)
        if tokenizer.pad_token_id is None:  # trl's convention
            tokenizer.pad_token = tokenizer.eos_token
        # trl's own collator (its masks come from its dataset preparation), given explicitly so trl
        # does not write the pad token into a generation_config our wrapper does not have.
        sft_collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                                       pad_to_multiple_of=args.pad_to_multiple_of)
        with no_datasets_bars():  # trl maps each split several times: a bar per map per stage
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


@contextlib.contextmanager
def no_datasets_bars():
    """The ``datasets`` library's progress bars off inside (restored after)."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


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
    """The same run with 0 memory tokens (segments processed independently), in OUTPUT_DIR/baseline.
    A resume resumes the baseline too when it had started, and starts it otherwise."""
    training = {**recipe.training, "output_dir": runs.baseline_dir(recipe.output_dir)}
    if training.get("resume_from_checkpoint"):
        training["resume_from_checkpoint"] = runs.has_started(training["output_dir"])
    return dataclasses.replace(recipe, memory=dataclasses.replace(recipe.memory, num_memory_tokens=0),
                               training=training, eval=dataclasses.replace(recipe.eval, baseline=False))


def run(recipe: Recipe, log=print) -> dict:
    """``train_recipe``, plus the 0-memory baseline when ``eval.baseline`` asks; the combined
    accuracy table is printed (stdout) and written to summary.json."""
    summary = train_recipe(recipe, log)
    if recipe.eval.baseline:
        end_run()  # the baseline reports as a run of its own
        lock = RunLock(recipe.output_dir) if is_main_process() else None  # the baseline lives inside the run
        if lock is not None:
            lock.acquire()
        try:
            log(f"the 0-memory baseline (eval.baseline): the same curriculum in "
                f"{runs.baseline_dir(recipe.output_dir)}")
            base = train_recipe(baseline_recipe(recipe), log)
        except TrainingDiverged as err:
            summary["status"] = "baseline diverged"
            summary["baseline"] = {"status": "diverged", "reason": str(err)}
            raise
        else:
            summary["baseline"] = base
            summary["accuracy"] = {"memory": {n: m["accuracy"] for n, m in summary["eval"].items()},
                                   "baseline": {n: m["accuracy"] for n, m in base["eval"].items()}}
        finally:
            if is_main_process():
                runs.write_summary(recipe.output_dir, summary)
            if lock is not None:
                lock.release()
    if is_main_process():
        write_model_card(runs.final_dir(recipe.output_dir), run_dir=recipe.output_dir)  # with the results
        print(format_table(summary), flush=True)  # the result: stdout, whatever the verbosity
    return summary


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(summary: dict) -> str:
    rows = sorted(summary["eval"], key=lambda n: int(n) if n.isdigit() else 1 << 30)  # "all": trl's eval split
    base = summary.get("baseline", {}).get("eval", {})
    m = summary["num_memory_tokens"]
    header = f"{'segments':>8} | {f'accuracy ({m} memory)':>22}" + (f" | {'accuracy (0 memory)':>20}" if base else "")
    lines = [header, "-" * len(header)]
    for n in rows:
        line = f"{n:>8} | {number(summary['eval'][n]['accuracy']):>22}"
        if base:
            line += f" | {number(base[n]['accuracy']):>20}"
        lines.append(line)
    return "\n".join(lines)
