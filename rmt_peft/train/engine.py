"""The step engine: Hugging Face's Trainer (or trl's SFTTrainer) with what an RMTModel changes.

``RMTTrainerMixin`` overrides a few Trainer methods, each with a comment saying why. Three of them
are transformers' private methods (``_get_grad_norm``, ``_load_optimizer_and_scheduler``,
``_load_from_checkpoint``): tests/train/test_engine.py checks that transformers still has them,
with the arguments used here, so a release that renames one fails that test instead of a run.
Saving writes only what trains (the adapter through ``rmt.save_pretrained``, never the frozen
backbone; under ZeRO-3 the trainable parameters are gathered first so the adapter is not empty).
Gradient accumulation, bf16, logging, evaluation, checkpoints and DeepSpeed are the Trainer's own.
"""
from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from ..fileio import atomic_path
from ..inputs import IGNORE_INDEX, MODEL_INPUTS
from ..metrics import exact_match
from ..recipe import Recipe, RecipeError
from ..recurrent import context_split
from ..runs import TRAINABLE_FILE
from .datasets import build_dataset, instruction_datasets, no_datasets_bars
from .guard import DivergenceGuard, set_base_learning_rate


def gathered(params):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every rank (a no-op otherwise)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


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
    _lever_sums: dict | None = None  # the memory's lever terms since the last log: name -> (sum, count)

    # override: each micro-batch's loss goes to the guard and into the stage's loss sum
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.note_loss(loss)
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        return loss

    def step_loss_sum(self) -> float:
        """The summed losses of the steps this Trainer took (the Trainer's train_loss times its steps)."""
        return float(self._loss_sum) if self._loss_sum is not None else 0.0

    # private override: the one place that sees a step's gradient norm before the optimizer applies it
    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of the step, checked (with the step's losses) before the
        optimizer applies it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.guard is not None:
            self.guard.check_step(grad_norm, self.state.global_step + 1)
        return grad_norm

    # private override: a rollback resumes a checkpoint whose saved optimizer holds the old learning rate
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint and self.base_learning_rate is not None:
            set_base_learning_rate(self.optimizer, self.lr_scheduler, self.base_learning_rate)

    # override: RMTModel computes its own loss over the segments, from the inputs it takes
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        self._note_levers(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _note_levers(self, outputs) -> None:
        """Sum (on the device, no sync) the lever terms a training forward reports: the memory's
        drift (the stability loss), the associative write gate (the write cost) and write-back loss."""
        for name in ("memory_drift", "write_gate", "write_back"):
            value = getattr(outputs, name, None)
            if value is not None:
                sums = self._lever_sums = self._lever_sums or {}
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value, count + 1)

    # override: the lever terms, averaged since the last log, join the training log (and so
    # TensorBoard, W&B and the other reporters): gates that drift open are seen as they do
    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._lever_sums:
            for name, (total, count) in self._lever_sums.items():
                logs[name] = round(float(total) / count, 6)
            self._lever_sums = {}
        super().log(logs, start_time)

    # override: exact match per sample, without the logits of the whole long input
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

    # override: only what trains is saved (the adapter and the trainable tensors), never the backbone
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_adapter(self.model, output_dir or self.args.output_dir, self.base_model, self.args.should_save)

    # private override: a resume loads the trainable tensors that save_model wrote, nothing else
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


def release_deepspeed(trainer: Trainer | None) -> None:
    """Let a finished stage's DeepSpeed engine go (its hooks and accelerate's DeepSpeed state), so
    the next stage's Trainer sets up its own engine on the same, still partitioned, weights."""
    if trainer is None or not trainer.is_deepspeed_enabled:
        return
    from accelerate.state import AcceleratorState

    trainer.model_wrapped.destroy()
    trainer.accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)

