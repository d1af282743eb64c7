"""The installed package, not the checkout: a wheel built from the project, installed into a folder
outside it, runs from another folder with the shipped recipes and DeepSpeed configs (the
repository's recipes/ and deepspeed_configs/, package data in the wheel) and through the launchers'
module entry (``python -m rmt_peft.train``), with 2 ranks; scripts/train.py is that entry too."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder with the wheel installed, environment that imports rmt_peft from there only)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a clean copy: the build writes build/ and *.egg-info beside its sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for name in ("rmt_peft", "recipes", "deepspeed_configs"):
        shutil.copytree(os.path.join(ROOT, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"),
                    str(source)], check=True, capture_output=True)
    (wheel,) = glob.glob(str(tmp / "dist" / "*.whl"))
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), wheel],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return site, wheel, env


def test_wheel_ships_recipes_deepspeed_configs_and_type_information(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in os.listdir(os.path.join(ROOT, "recipes")):
        assert f"rmt_peft/recipes/{name}" in names
    for name in os.listdir(os.path.join(ROOT, "deepspeed_configs")):
        assert f"rmt_peft/deepspeed_configs/{name}" in names
    assert "rmt_peft/py.typed" in names


def run_installed(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_installed_package_validates_and_copies_recipes_from_another_folder(installed, tmp_path):
    site, _, env = installed
    where = run_installed(["-c", "import rmt_peft; print(rmt_peft.__file__)"], env, tmp_path)
    assert where.stdout.startswith(str(site)), where  # the installed copy, not the checkout
    out = run_installed(["-m", "rmt_peft.cli", "validate", "quickstart", "training.deepspeed=zero2",
                         f"training.output_dir={tmp_path / 'run'}"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"deepspeed {site}/rmt_peft/deepspeed_configs/zero2.json" in out.stdout
    # the path a checkout's README used still names the shipped recipe
    assert run_installed(["-m", "rmt_peft.cli", "validate", "recipes/quickstart.yaml"], env, tmp_path).returncode == 0

    listing = run_installed(["-m", "rmt_peft.cli", "recipes"], env, tmp_path)
    assert "quickstart" in listing.stdout and "zero3_offload" in listing.stdout
    assert run_installed(["-m", "rmt_peft.cli", "recipes", "quickstart"], env, tmp_path).returncode == 0
    copied = (tmp_path / "quickstart.yaml").read_text()
    with open(os.path.join(ROOT, "recipes", "quickstart.yaml")) as f:
        assert copied == f.read()
    again = run_installed(["-m", "rmt_peft.cli", "recipes", "quickstart"], env, tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwrites an edited copy


def test_the_launcher_script_is_rmt_peft_train(installed, tmp_path):
    """``deepspeed scripts/train.py RECIPE ...`` runs what ``deepspeed --module rmt_peft.train`` runs:
    ``rmt-peft train``, which takes the ``--local_rank`` the launcher puts first."""
    _, _, env = installed
    script = os.path.join(ROOT, "scripts", "train.py")
    usage = run_installed([script, "--help"], env, tmp_path)
    assert usage.returncode == 0 and "usage: rmt-peft train" in usage.stdout
    missing = run_installed([script, "--local_rank=0", "no_such_recipe"], env, tmp_path)
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and last.startswith("rmt-peft train: error: invalid recipe no_such_recipe"), last


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_installed_package_trains_on_two_ranks_from_another_folder(installed, tmp_path):
    _, _, env = installed
    out = tmp_path / "run"
    result = run_installed(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "rmt_peft.train",
         "quickstart", f"training.output_dir={out}", "curriculum.segments=[1]", "curriculum.steps_per_stage=2",
         "data.num_train_samples=64", "data.num_eval_samples=8", "eval.num_segments=[2]", "eval.num_samples=8",
         "eval.baseline=false", "training.per_device_train_batch_size=4", "training.report_to=none"],
        env, tmp_path, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["steps"] == 2 and set(summary["eval"]) == {"2"}
    logs = result.stdout + result.stderr
    assert logs.count("stage 1 of 1 (stage-0): [1] segment(s)") == 1  # the main process speaks, the other rank does not
    assert "gemm_4bit_forward" not in logs and "Setting accelerator to CPU" not in logs


def test_a_transformers_older_than_the_lowest_tested_is_refused_at_import(tmp_path):
    from rmt_peft import MIN_TRANSFORMERS

    old = tmp_path / "transformers-5.16.0.dist-info"  # what the package metadata of 5.16 says
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.16.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    result = subprocess.run([sys.executable, "-c", "import rmt_peft"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ImportError: rmt-peft needs transformers>={MIN_TRANSFORMERS}, found 5.16.0" in result.stderr
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f'"transformers>={MIN_TRANSFORMERS}"' in f.read()  # one lower bound, stated twice
