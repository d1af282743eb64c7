"""`rmt-peft ask`: answers from a stored memory equal answers after reading document + question,
and a document of a million tokens is read in constant memory."""
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch
import yaml

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft import ask_command
from rmt_peft.cli import main
from rmt_peft.data.noise import encode
from rmt_peft.data.tokenizer import offline_tokenizer, save_offline_tokenizer
from rmt_peft.tiny_models import tiny_model
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import run as train

WORDS = "Mary went to the kitchen . John picked up the football . Where is the apple ? The milk is in the garden ."


def document_text(words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    vocab = WORDS.split()
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(words // 7)]
    return "\n".join(lines) + "\n"


def test_text_pieces_tokenize_like_the_whole_text(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Mary  went\tto the\n\nkitchen ?" + " apple" * 300 + "  ")
    tokenizer = offline_tokenizer()
    pieces = list(ask_command.text_pieces(str(path), chars=7))
    assert "".join(p for p, _ in pieces) == path.read_text()
    assert sum(n for _, n in pieces) == path.stat().st_size
    assert [t for p, _ in pieces for t in encode(tokenizer, p)] == encode(tokenizer, path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("memory_kind", ["tokens", "associative"])
def test_ask_answers_from_a_stored_memory_like_after_reading_everything(tmp_path, monkeypatch, capsys, memory_kind):
    # A tiny trained run: BABILong memorize on a tiny GPT-Neo with the offline tokenizer, a few steps.
    recipe = {"model": {"name_or_path": "tiny:gpt_neo", "config": {"vocab_size": 640, "max_positions": 64}},
              "memory": {"num_memory_tokens": 4, "segment_size": 24, "memory_kind": memory_kind,
                         "associative_key_size": 8}, "lora": None,
              "data": {"task": "babilong_memorize", "options": {"noise": "generated"}, "num_train_samples": 8,
                       "num_eval_samples": 2},
              "curriculum": {"segments": [2], "steps_per_stage": 3}, "eval": {"num_segments": [2], "num_samples": 2},
              "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2,
                           "learning_rate": 1e-3, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(str(tmp_path / "recipe.yaml")), log=lambda *_: None)
    capsys.readouterr()  # training prints its summary
    document = tmp_path / "doc.txt"
    document.write_text(document_text(300))
    questions = ["Where is the milk ?", "What did John pick up ?", "Where is Mary ?"]
    monkeypatch.setattr(ask_command, "READ_CHARS", 50)  # many pieces: their borders must not matter

    run = str(tmp_path / "run")
    memory = str(tmp_path / "doc.memory.safetensors")
    args = ["ask", run, "--no-progress", "--device", "cpu", "--max-new-tokens", "6"]
    assert main(args + ["--document", str(document), "--save-memory", memory]
                + [a for q in questions for a in ("--question", q)]) == 0
    answers = capsys.readouterr().out.splitlines()

    # Independently: the whole document and the question in one generate call.
    rmt = RMTModel.from_pretrained(str(tmp_path / "run" / "final")).eval()
    tokenizer = offline_tokenizer()
    doc_ids = encode(tokenizer, document.read_text())
    assert len(doc_ids) % 24 != 0  # the pending tokens after the last whole segment are part of the check
    expected = []
    for q in questions:
        ids = torch.tensor([doc_ids + encode(tokenizer, " " + q)])
        new = rmt.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
        expected.append(" ".join(tokenizer.decode(new[0], skip_special_tokens=True).split()))
    assert answers == expected
    assert len(set(answers)) > 1 or answers[0]  # not all empty: the answers carry tokens to compare

    # Later: the stored memory, questions from standard input, no document.
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n\n"))
    assert main(args + ["--memory", memory]) == 0
    assert capsys.readouterr().out.splitlines() == expected

    # A memory read with another segment size does not fit: one line naming the field, exit code 2.
    other = tmp_path / "other"
    rmt.memory_config = dataclasses.replace(rmt.memory_config, segment_size=16)
    rmt.save_pretrained(str(other))
    save_offline_tokenizer(str(other))
    assert main(["ask", str(other), "--memory", memory, "--question", "x", "--device", "cpu"]) == 2
    assert "segment_size: 24 in" in capsys.readouterr().err


# `rmt-peft ask` with the peak of the Python heap (tracemalloc) printed after each piece of the
# document is read; pieces of 256 KiB (a quarter of the default) give ~20 per million tokens
PEAK_PER_PIECE = """
import sys, tracemalloc
from rmt_peft import ask_command
from rmt_peft.cli import main
ask_command.READ_CHARS = 1 << 18
pieces = ask_command.text_pieces
def recorded(path, **kwargs):
    tracemalloc.start()
    for item in pieces(path, **kwargs):
        yield item
        print("PEAK", tracemalloc.get_traced_memory()[1], file=sys.stderr)
ask_command.text_pieces = recorded
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ask_reads_a_million_token_document_in_constant_memory(tmp_path):
    # A tiny one-layer Llama with 4096-token segments (RoPE: no position table to fit).
    backbone = tiny_model("llama", vocab_size=640, hidden_size=32, num_layers=1, num_heads=2)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=4096), verbose=False)
    rmt.save_pretrained(str(tmp_path / "model"))
    save_offline_tokenizer(str(tmp_path / "model"))
    block = document_text(7000, seed=1)
    block_tokens = len(encode(offline_tokenizer(), block))
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(-(-1_000_000 // block_tokens)):
            f.write(block)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", PEAK_PER_PIECE, "ask", str(tmp_path / "model"), "--document",
                           str(tmp_path / "big.txt"), "--question", "Where is Mary ?", "--max-new-tokens", "2",
                           "--device", "cpu", "--no-progress", "--save-memory", str(tmp_path / "m.safetensors")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = [int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("PEAK")]
    saved = next(x for x in done.stderr.splitlines() if x.startswith("saved the memory"))
    assert int(saved.split()[4]) >= 1_000_000 and len(peaks) >= 16
    # The peak of the Python heap is set by the first piece (its text, its ids) and must not move:
    # holding the ids read so far would add ~36 MB by the end, the text ~5 MB. (The process's
    # resident size cannot show this: loading the model peaks higher, and the allocator moves it by
    # more than 10 MiB from piece to piece.)
    growth = peaks[-1] - peaks[1]
    assert growth < 2 * 2**20, f"the Python heap's peak grew by {growth / 2**20:.1f} MiBover a 1M-token document"


def test_ask_refuses_a_run_on_raw_token_ids_before_loading_it(tmp_path, capsys):
    """The quickstart learns token ids without a tokenizer: one line saying why, not an IndexError."""
    from rmt_peft import resources

    run = tmp_path / "quickstart"
    (run / "final").mkdir(parents=True)  # never opened: the check comes before the model loads
    (run / "recipe.yaml").write_text(open(resources.path(resources.RECIPES, "quickstart")).read())
    (tmp_path / "doc.txt").write_text("Mary went to the garden.")
    assert main(["ask", str(run), "--document", str(tmp_path / "doc.txt"), "--question", "Where is Mary?"]) == 2
    err = capsys.readouterr().err
    assert "trained on raw token ids (data.task 'token_memory'" in err and "babilong_" in err
    assert main(["ask", str(run), "--document", str(tmp_path / "missing.txt")]) == 2
    assert "--document" in capsys.readouterr().err
