"""Bad input in every command ends as one line naming the file, key or argument, with exit code 2
(never a traceback, never a silent default); nothing half-written is left behind."""
import json
import os

import pytest

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.cli import main
from rmt_peft.data import lean
from rmt_peft.tiny_models import tiny_model

OFFLINE = os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.fixture
def files(tmp_path):
    """Noise files: one empty, one binary; an adapter folder whose weights are cut short."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 8)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=8), lora=None)
    adapter = tmp_path / "adapter"
    rmt.save_pretrained(str(adapter))
    with open(adapter / "memory.safetensors", "r+b") as f:
        f.truncate(40)
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def noise(pattern):
    # babilong_memorize with local noise files; vocab 594 fits the offline tokenizer
    return ["data.task=babilong_memorize", "model.config.vocab_size=594",
            f"data.options={{noise: {{source: files, files: '{pattern}'}}}}"]


CASES = {  # name: (argv built from the recipe path and tmp folder, expected text of the error line)
    "negative lr": (lambda r, t: ["validate", r, "training.learning_rate=-1"],
                    "training.learning_rate=-1.0 must be a finite number > 0"),
    "infinite lr": (lambda r, t: ["validate", r, "training.learning_rate=.inf"], "training.learning_rate=inf"),
    "zero batch size": (lambda r, t: ["validate", r, "training.per_device_train_batch_size=0"],
                        "training.per_device_train_batch_size=0 must be"),
    "negative batch size (train)": (lambda r, t: ["train", r, "training.per_device_train_batch_size=-4"],
                                    "training.per_device_train_batch_size=-4 must be"),
    "guard choice": (lambda r, t: ["validate", r, "guard.on_divergence=maybe"],
                     "guard.on_divergence='maybe' is not allowed; allowed: ['stop', 'rollback']"),
    "guard factor": (lambda r, t: ["validate", r, "guard.rollback_lr_factor=2"], "guard.rollback_lr_factor=2.0"),
    "unknown guard key": (lambda r, t: ["validate", r, "guard.patience=3"], "guard.patience"),
    "noise matches nothing": (lambda r, t: ["validate", r, *noise(f"{t}/nothing/*.txt")], "no file matches"),
    "noise empty": (lambda r, t: ["validate", r, *noise(f"{t}/empty.txt")], "empty.txt: empty"),
    "noise binary": (lambda r, t: ["train", r, *noise(f"{t}/binary.bin")], "binary.bin: binary"),
    "output is a file": (lambda r, t: ["validate", r, f"training.output_dir={t}/a_file"], "is a file"),
    "output under a file": (lambda r, t: ["validate", r, f"training.output_dir={t}/a_file/run"], "is a file"),
    "eval: not a run": (lambda r, t: ["eval", str(t)], "neither a training run"),
    "eval: no such path": (lambda r, t: ["eval", f"{t}/missing"], "missing is not a folder"),
    "eval: damaged weights": (lambda r, t: ["eval", f"{t}/adapter", "--task", "token_memory"],
                              "memory.safetensors is damaged"),
    "eval: samples 0": (lambda r, t: ["eval", f"{t}/adapter", "--samples", "0"], "--samples 0: expected"),
    "eval: unknown task": (lambda r, t: ["eval", f"{t}/adapter", "--task", "nope"], "--task 'nope' is not known"),
    "eval: bad task options": (lambda r, t: ["eval", f"{t}/adapter", "--task", "token_memory", "--task-options",
                                             "{num_values: 0}"], "num_values=0 must be"),
    "export: no source": (lambda r, t: ["export", f"{t}/missing", "--to", f"{t}/out"], "is not a folder"),
}
if OFFLINE:
    CASES["eval: Hub id offline"] = (lambda r, t: ["eval", "someone/some-model", "--task", "token_memory"],
                                     "cannot load someone/some-model")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_named_line_with_exit_2(name, files, write_recipe, capsys):
    argv, expected = CASES[name]
    code = main(argv(write_recipe(), str(files)))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error" in line or "invalid" in line or "cannot" in line]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not os.path.exists(files / "recipe")  # no run folder from a refused start


def leandojo(tmp_path, benchmark, corpus: bytes):
    if isinstance(benchmark, bytes):
        (tmp_path / "train.json").write_bytes(benchmark)
    else:
        (tmp_path / "train.json").write_text(benchmark if isinstance(benchmark, str) else json.dumps(benchmark))
    (tmp_path / "corpus.jsonl").write_bytes(corpus)
    return [str(tmp_path / "train.json"), str(tmp_path / "corpus.jsonl")]


GOOD_CORPUS = json.dumps({"premises": [{"full_name": "Nat.add_zero", "code": "theorem Nat.add_zero"}]}).encode()
GOOD_THEOREM = {"full_name": "t", "traced_tactics": [{"tactic": "simp", "state_before": "⊢ True"}]}


@pytest.mark.parametrize("benchmark, corpus, expected", [
    ("[1, 2", GOOD_CORPUS, "train.json: not JSON (line 1"),
    (json.dumps({"a": 1}), GOOD_CORPUS, "expected a JSON list of theorems"),
    (b"[\xff\xfe]", GOOD_CORPUS, "train.json: not UTF-8 text (byte 1)"),
    ([{"name": "x"}, {"full_name": "y", "traced_tactics": [{"tactic": 3}]}], GOOD_CORPUS, "no theorem with"),
    ([GOOD_THEOREM], bytes(range(256)) * 4, "corpus.jsonl: no premise"),
    ([GOOD_THEOREM], b"", "corpus.jsonl: no premise"),
])
def test_the_lean_importer_names_the_bad_file_and_writes_nothing(tmp_path, capsys, benchmark, corpus, expected):
    out = tmp_path / "out"
    assert lean.main(["import-leandojo", *leandojo(tmp_path, benchmark, corpus), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists() or not os.listdir(out)


def test_the_lean_importer_skips_bad_records_and_writes_the_good_ones(tmp_path, capsys):
    paths = leandojo(tmp_path, [GOOD_THEOREM, {"full_name": 5}, "text"], GOOD_CORPUS + b"\n{bad json\n\xff\xfe\n")
    assert lean.main(["import-leandojo", *paths, str(tmp_path / "out")]) == 0
    assert "wrote 1 theorems and 1 lemmas" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["lemmas.jsonl", "theorems.jsonl"]


def test_the_lean_importer_replaces_its_files_only_with_overwrite(tmp_path, capsys):
    paths = leandojo(tmp_path, [GOOD_THEOREM], GOOD_CORPUS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "theorems.jsonl").write_text("mine\n")
    assert lean.main(["import-leandojo", *paths, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds theorems.jsonl" in err and "--overwrite" in err
    assert (out / "theorems.jsonl").read_text() == "mine\n" and not (out / "lemmas.jsonl").exists()
    assert lean.main(["import-leandojo", *paths, str(out), "--overwrite"]) == 0
    assert (out / "theorems.jsonl").read_text() != "mine\n"
