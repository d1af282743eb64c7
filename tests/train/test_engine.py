"""The step engine's overrides of transformers' Trainer (rmt_peft/train/engine.py)."""
import inspect

from transformers import Trainer

from rmt_peft.train.engine import RMTTrainerMixin

OWN = {"step_loss_sum"}  # the mixin's own methods; every other one overrides the Trainer's


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
