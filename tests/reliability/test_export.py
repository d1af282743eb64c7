"""``rmt-peft export`` never deletes what it did not write: a non-empty target needs --overwrite,
and a target that is the run, or a folder holding it, is refused even with --overwrite."""
import os

import pytest

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.cli import main
from rmt_peft.tiny_models import tiny_model


@pytest.fixture
def run(tmp_path):
    """parent/run/final: a saved tiny model, as a training run leaves it; parent holds a user file."""
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=8), lora=None)
    folder = tmp_path / "parent" / "run"
    rmt.save_pretrained(str(folder / "final"))
    (folder / "summary.json").write_text("{}")
    (tmp_path / "parent" / "notes.txt").write_text("mine")
    return folder


def snapshot(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, files in os.walk(folder) for name in files)


@pytest.mark.parametrize("target", ["run", "parent", "final", "."])
def test_a_target_that_is_or_holds_the_run_is_refused_even_with_overwrite(run, target, capsys):
    to = {"run": run, "parent": run.parent, "final": run / "final", ".": run.parent.parent}[target]
    before = snapshot(run.parent.parent)
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(run), "--to", str(to), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--to {to}" in err
    assert snapshot(run.parent.parent) == before


def test_a_non_empty_target_needs_overwrite_and_keeps_its_files_without_it(run, tmp_path, capsys):
    to = tmp_path / "exported"
    to.mkdir()
    (to / "keep.txt").write_text("user file")
    assert main(["export", str(run), "--to", str(to)]) == 2
    assert "already holds files" in capsys.readouterr().err and (to / "keep.txt").read_text() == "user file"
    assert main(["export", str(run), "--to", str(to), "--overwrite"]) == 0
    assert "memory.safetensors" in os.listdir(to) and not (to / "keep.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), "--to", str(empty)]) == 0  # an empty folder is no loss
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
