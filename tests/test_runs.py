"""The run folder (rmt_peft/runs.py): its names and paths, what a folder is, where a run may start
or resume, which save a resume takes, and where other commands may write. The end-to-end checks
(kills, damage, full disks, every command that writes) are in tests/reliability/."""
import os

import pytest

from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.runs import check_start


def test_output_dir_holding_another_run_is_never_overwritten(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    os.makedirs(recipe.output_dir)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(RecipeError, match="already holds files"):
        check_start(recipe.output_dir, resume=False)
    with pytest.raises(RecipeError, match="no run to resume"):
        check_start(recipe.output_dir, resume=True)
