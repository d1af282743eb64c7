"""Every command that README.md and docs/*.md show runs as written: the test reads the commands
from the pages, so the docs and the code cannot drift apart.

Each ```bash block of those pages carries a marker on the line before it:

    <!-- docs-test: cpu -->                    every command runs here: CPU, offline, exit code 0
    <!-- docs-test: skip (needs a GPU ...) -->  not run here; the reason is reported as the skip's

A ```python block marked ``cpu`` runs too (unmarked Python blocks are examples for a GPU or the
Hub). Each block runs in a folder of its own, one command at a time (``\\`` continues a line), with
HF_HUB_OFFLINE=1. Training commands get SHORTER appended (the pages say so), and the quickstart
run (QUICKSTART) is trained once per session and copied into each block that trains it.
"""
import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(cpu|skip)\s*(?:\((.+)\))?\s*-->")
# what the pages say the test suite adds to their training commands (README.md, "Tests")
SHORTER = "curriculum.steps_per_stage=20 data.num_train_samples=640 eval.num_samples=64"
QUICKSTART = "rmt-peft train quickstart training.output_dir=runs/quickstart"
COMMAND_TIMEOUT = 300


@dataclasses.dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    marker: str | None  # "cpu", "skip" or None
    reason: str | None
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[str]:
        """Shell commands: comments dropped, continued lines joined."""
        commands, current = [], ""
        for line in self.text.splitlines():
            current += without_comment(line).rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
            elif current.strip():
                commands.append(" ".join(current.split()) if not re.search("[\"']", current) else current.strip())
                current = ""
        return commands


def without_comment(line: str) -> str:
    """``line`` up to a shell comment (a # at a word start, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            lines = f.read().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.search(previous)
            found.append(Block(page, i + 1, fence.group(1), marker.group(1) if marker else None,
                               marker.group(2) if marker else None, "\n".join(lines[i + 1:end])))
            i = end + 1
    return found


BLOCKS = blocks()
SHELL = [b for b in BLOCKS if b.language in ("bash", "sh", "shell")]
RUNNABLE = SHELL + [b for b in BLOCKS if b.language == "python" and b.marker is not None]


def test_every_shell_block_says_whether_it_runs_here():
    unmarked = [b.id for b in SHELL if b.marker is None or (b.marker == "skip" and not b.reason)]
    assert not unmarked, f"add <!-- docs-test: cpu --> or <!-- docs-test: skip (why) --> before: {unmarked}"
    assert sum(b.marker == "cpu" for b in SHELL) >= 5  # the parser still finds the blocks


def environment() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "100"}
    # the rmt-peft and python of this interpreter's environment, the package of this checkout
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_command(command: str, folder: str) -> None:
    if command.startswith("rmt-peft train "):
        command += " " + SHORTER
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", command], cwd=folder, env=environment(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, (f"{command!r} in {folder} exited with {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"{time.perf_counter() - started:6.1f} s  {command}")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart run (QUICKSTART + SHORTER), trained once for every block that trains it."""
    folder = str(tmp_path_factory.mktemp("quickstart"))
    run_command(QUICKSTART, folder)
    return os.path.join(folder, "runs", "quickstart")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_documented_commands_run_as_written(block, tmp_path, request):
    if block.marker == "skip":
        pytest.skip(f"{block.id}: {block.reason}")
    folder = str(tmp_path)
    if block.language == "python":
        with open(os.path.join(folder, "snippet.py"), "w") as f:
            f.write(block.text)
        run_command(f"{shlex.quote(sys.executable)} snippet.py", folder)
        return
    for command in block.commands():
        if command == QUICKSTART:  # the session's run, trained as written
            shutil.copytree(request.getfixturevalue("quickstart_run"), os.path.join(folder, "runs", "quickstart"))
            continue
        run_command(command, folder)
