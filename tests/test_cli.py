"""The command line as a user meets it: --version, fast --help, one-line user errors (tracebacks
with -v)."""
import os
import subprocess
import resource
import sys

import pytest

import rmt_peft
from rmt_peft.cli import build_parser, main
from rmt_peft.recipe import RecipeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "datasets", "numpy")


def python(code_or_args, **kwargs):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, **kwargs)


def test_help_of_every_command_imports_nothing_heavy_and_is_fast():
    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "validate", "recipes", "eval", "export", "ask", "flops"} <= set(commands)
    probe = python("import sys\nfrom rmt_peft.cli import main\n"
                   f"for c in {commands!r}:\n"
                   "    try: main([c, '--help'])\n"
                   "    except SystemExit: pass\n"
                   f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "HEAVY []"
    for command in commands:  # a whole process: interpreter start + parser
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = python(["-m", "rmt_peft.cli", command, "--help"])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert result.returncode == 0 and "usage: rmt-peft" in result.stdout
        # written for users: no reST markup, no notes on how the module keeps --help fast
        assert "``" not in result.stdout and "For developers" not in result.stdout, result.stdout
        # CPU time, not wall time: on a loaded shared machine waiting for a core is not our cost
        # (importing torch + transformers alone takes about 4 s of CPU)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 1.0, (command, cpu)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rmt-peft {rmt_peft.__version__}"


def test_user_error_is_one_line_with_exit_code_2_and_its_traceback_with_v(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err and err.startswith("rmt-peft validate: error:")
    with pytest.raises(RecipeError, match="nope.yaml"):
        main(["validate", missing, "-v"])
