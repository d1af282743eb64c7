"""The recipe schema lives in ``rmt_peft.recipe`` (it is the schema of the whole system: training,
eval, export and ask read it); this module keeps ``from rmt_peft.train.recipe import load_recipe``
working."""
from ..recipe import *  # noqa: F403 - the old import path, re-exported as it was
