"""The quickstart recipe end to end (fewer steps): the memory model beats the 0-memory baseline."""
import json

import pytest

from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import run



@pytest.mark.slow
def test_quickstart_memory_beats_the_no_memory_baseline(tmp_path, capsys):
    out = tmp_path / "quickstart"
    lines = []
    recipe = load_recipe("quickstart", [
        f"training.output_dir={out}", "curriculum.steps_per_stage=40", "training.learning_rate=5e-3",
        "data.num_train_samples=1280", "eval.num_segments=[1,3,4]", "eval.num_samples=128",
        "training.report_to=none", "training.disable_tqdm=true"])
    run(recipe, log=lines.append)

    summary = json.loads((out / "summary.json").read_text())
    memory, baseline = summary["accuracy"]["memory"], summary["accuracy"]["baseline"]
    assert set(memory) == set(baseline) == {"1", "3", "4"}
    # 10 possible values: the baseline cannot see segment 0 from segment 3 (chance is 0.1)
    assert baseline["3"] <= 0.3
    assert memory["3"] >= baseline["3"] + 0.3
    assert memory["4"] > baseline["4"]  # one segment longer than anything it was trained on
    for folder in (out / "final", out / "baseline" / "final"):
        assert (folder / "memory_config.json").exists() and (folder / "memory.safetensors").exists()
    assert json.loads((out / "baseline" / "final" / "memory_config.json").read_text())["num_memory_tokens"] == 0
    assert (out / "recipe.yaml").exists()
    # stdout holds the result table and nothing else (the Trainer's log dicts go to stderr)
    table = capsys.readouterr().out
    assert "accuracy (4 memory)" in table and "accuracy (0 memory)" in table and len(table.splitlines()) == 5
    assert lines[0] == "stage 1 of 3 (stage-0): [1] segment(s), up to 40 steps"
