"""``rmt-peft train`` / ``recipes``: a model that cannot load is one line, and a failed start leaves
no folder behind."""
import os

import yaml

from rmt_peft.cli import main


def test_uncached_hub_model_offline_is_a_user_error_and_leaves_no_folder(write_recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe({"model": {"name_or_path": "rmt-peft-tests/not-a-cached-model"}})
    out = yaml.safe_load(open(path))["training"]["output_dir"]
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("rmt-peft train: error: "), err
    assert "model.name_or_path='rmt-peft-tests/not-a-cached-model' could not be loaded (offline" in err
    assert not os.path.exists(out)  # the same output_dir works for the next try
    assert main(["train", path]) == 2 and "already holds files" not in capsys.readouterr().err
