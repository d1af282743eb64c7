"""The step engine (rmt_peft/train/engine.py): its overrides of transformers' Trainer still match the
Trainer's methods, and RMTTrainer computes for an RMTModel what one forward computes."""
import inspect

import pytest
import torch
from transformers import Trainer

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.metrics import exact_match
from rmt_peft.tiny_models import tiny_model
from rmt_peft.train.engine import RMTTrainer, RMTTrainerMixin

OWN = {"step_loss_sum", "_note_levers"}  # the mixin's own methods; every other one overrides the Trainer's


def test_every_override_still_exists_in_transformers_with_the_same_parameters():
    """A transformers release that renames or reshapes a method the engine overrides (three of them
    private: _get_grad_norm, _load_optimizer_and_scheduler, _load_from_checkpoint) fails here, instead
    of the override silently never being called."""
    overrides = {name: f for name, f in vars(RMTTrainerMixin).items() if inspect.isfunction(f) and name not in OWN}
    assert {"_get_grad_norm", "_load_optimizer_and_scheduler", "_load_from_checkpoint", "save_model"} <= set(overrides)
    for name, function in overrides.items():
        assert hasattr(Trainer, name), f"transformers.Trainer has no {name} any more"
        theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
        ours = list(inspect.signature(function).parameters)
        assert ours == theirs, (name, ours, theirs)


def test_evaluation_reads_the_context_and_scores_like_one_forward(tmp_path):
    """Labels in the last segment only, one row padded on the right: prediction_step gives the
    loss and the per-sample exact match of one forward over the whole input (with its logits)."""
    from transformers import TrainingArguments

    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", vocab_size=64, max_positions=64),
                                 MemoryConfig(num_memory_tokens=4, segment_size=8), verbose=False).eval()
    ids = torch.randint(1, 64, (3, 37))  # 5 segments, the last one short
    mask = torch.ones_like(ids)
    mask[2, 33:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 34:] = ids[:, 34:]
    labels[1, 32] = ids[1, 32]  # predicted by position 31: the context ends at 24
    labels[2, 33:] = -100
    labels[2, 30:33] = ids[2, 30:33]
    trainer = RMTTrainer(model=rmt, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss, correct, _ = trainer.prediction_step(rmt, dict(inputs), prediction_loss_only=False)
    with torch.no_grad():
        whole = rmt(**inputs, return_logits=True)
    assert loss.item() == pytest.approx(whole.loss.item(), rel=1e-5)
    assert correct[:, 0].tolist() == exact_match(whole.logits, labels).tolist()
