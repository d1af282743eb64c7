"""`rmt-peft ask`: answers from a stored memory equal answers after reading document + question,
and a document of a million tokens is read in constant memory."""
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
def test_ask_answers_from_a_stored_memory_like_after_reading_everything(tmp_path, monkeypatch, capsys):
    # A tiny trained run: BABILong memorize on a tiny GPT-Neo with the offline tokenizer, a few steps.
    recipe = {"model": {"name_or_path": "tiny:gpt_neo", "config": {"vocab_size": 640, "max_positions": 64}},
              "memory": {"num_memory_tokens": 4, "segment_size": 24}, "lora": None,
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
    rmt.memory_config = MemoryConfig(num_memory_tokens=4, segment_size=16)
    rmt.save_pretrained(str(other))
    save_offline_tokenizer(str(other))
    assert main(["ask", str(other), "--memory", memory, "--question", "x", "--device", "cpu"]) == 2
    assert "segment_size: 24 in" in capsys.readouterr().err


MAX_RSS = ("import resource, sys; from rmt_peft.cli import main; code = main(sys.argv[1:]); "
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")


@pytest.mark.slow
def test_ask_reads_a_million_token_document_in_constant_memory(tmp_path):
    # A tiny one-layer Llama with 4096-token segments (RoPE: no position table to fit).
    backbone = tiny_model("llama", vocab_size=640, hidden_size=32, num_layers=1, num_heads=2)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=4096), verbose=False)
    rmt.save_pretrained(str(tmp_path / "model"))
    save_offline_tokenizer(str(tmp_path / "model"))
    tokenizer = offline_tokenizer()
    block = document_text(7000, seed=1)
    block_tokens = len(encode(tokenizer, block))
    (tmp_path / "small.txt").write_text(block)
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(-(-1_000_000 // block_tokens)):
            f.write(block)

    def ask(document):
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        done = subprocess.run([sys.executable, "-c", MAX_RSS, "ask", str(tmp_path / "model"), "--document",
                               str(document), "--question", "Where is Mary ?", "--max-new-tokens", "2",
                               "--device", "cpu", "--no-progress", "--save-memory", str(tmp_path / "m.safetensors")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        line = next(x for x in done.stderr.splitlines() if x.startswith("MAXRSS"))
        saved = next(x for x in done.stderr.splitlines() if x.startswith("saved the memory"))
        return int(line.split()[1]) * 1024, int(saved.split()[4])

    small_rss, small_tokens = ask(tmp_path / "small.txt")
    big_rss, big_tokens = ask(tmp_path / "big.txt")
    assert small_tokens == block_tokens and big_tokens >= 1_000_000
    # Holding the document's tokens would take 8 MB as a tensor and ~40 MB as a Python list, its
    # text ~5 MB; reading it in pieces keeps the peak where the small document left it.
    growth = big_rss - small_rss
    assert growth < 16 * 2**20, f"peak memory grew by {growth / 2**20:.1f} MiB for a 1M-token document"
