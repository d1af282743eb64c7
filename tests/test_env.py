"""``rmt-peft env`` (rmt_peft/env.py): the versions and devices a bug report needs."""
import platform
from importlib.metadata import version

import pytest

from rmt_peft import env
from rmt_peft.cli import main


def test_versions_come_from_the_installed_metadata_and_a_missing_package_says_so(monkeypatch):
    found = env.versions()
    assert found["python"] == platform.python_version()
    assert found["transformers"] == version("transformers") and found["peft"] == version("peft")
    assert set(env.PACKAGES) <= set(found)
    monkeypatch.setattr(env, "PACKAGES", ("rmt-peft-no-such-package",))
    assert env.versions()["rmt-peft-no-such-package"] == "not installed"


def test_devices_name_the_cpu_threads_and_cuda(monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found = env.devices()
    assert found["cpu threads (torch)"] == str(torch.get_num_threads())
    assert found["OMP_NUM_THREADS"] == "3" and found["cuda"] == "not available"


@pytest.mark.parametrize("offline", [None, "1"])
def test_env_prints_versions_and_devices(capsys, monkeypatch, offline):
    import torch
    import transformers

    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "- torch:" in out and torch.__version__ in out and transformers.__version__ in out and "cuda" in out
    assert ("- HF_HUB_OFFLINE:" in out) == (offline is not None)
