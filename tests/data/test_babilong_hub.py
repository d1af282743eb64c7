"""babilong_hub on a local folder laid out like RMT-team/babilong (configs by length, splits by task)."""
import json
import logging

import pytest
import torch

from rmt_peft.data.babilong_hub import nominal_tokens
from rmt_peft.data.registry import build_dataset

from .test_lean import encode

ROWS = {  # config -> split -> rows, as on the Hub: input (facts in background text), question, target
    "0k": {"qa1": [{"input": "Mary went to the kitchen . John went to the garden .", "question": "Where is Mary ?",
                    "target": "kitchen"},
                   {"input": "Daniel went to the office .", "question": "Where is Daniel ?", "target": "office"}],
           "qa2": [{"input": "John took the apple . John went to the park .", "question": "Where is the apple ?",
                    "target": "park"}]},
    "1k": {"qa1": [{"input": "Sandra went to the hallway . " + "the cat sat on the mat . " * 40,
                    "question": "Where is Sandra ?", "target": "hallway"},
                   {"input": "Bill went to the bedroom . " + "the dog ran in the park . " * 400,  # too long
                    "question": "Where is Bill ?", "target": "bedroom"},
                   {"input": "Fred went to the cinema . " + "the bird flew over the house . " * 30,
                    "question": "Where is Fred ?", "target": "cinema"}]},
}


@pytest.fixture(scope="module")
def babilong_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("babilong")
    configs = []
    for length, splits in ROWS.items():
        files = []
        for task, rows in splits.items():
            (folder / "data" / task).mkdir(parents=True, exist_ok=True)
            (folder / "data" / task / f"{length}.json").write_text(json.dumps(rows))
            files.append(f"  - split: {task}\n    path: data/{task}/{length}.json")
        configs.append(f"- config_name: {length}\n  data_files:\n" + "\n".join(files))
    (folder / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    return str(folder)


def build(folder, tokenizer, num_segments, num_samples=2, **options):
    return build_dataset("babilong_hub", {"path": folder, **options}, tokenizer=tokenizer, segment_size=512,
                         num_segments=num_segments, num_samples=num_samples, seed=0)


def test_samples_are_input_question_answer_with_the_answer_labelled(babilong_folder, tokenizer):
    data = build(babilong_folder, tokenizer, num_segments=1)  # 512 tokens: auto picks "0k"
    assert data.config == "0k"
    seen = set()
    for i in range(2):
        sample = data[i]
        answer = sample["answer_ids"].tolist()
        row = next(r for r in ROWS["0k"]["qa1"] if encode(tokenizer, " " + r["target"]) == answer)
        seen.add(row["target"])
        expected = (encode(tokenizer, row["input"]) + encode(tokenizer, " " + row["question"])
                    + encode(tokenizer, " " + row["target"]))
        assert sample["input_ids"].tolist() == expected
        answer = len(sample["answer_ids"])
        assert (sample["labels"][:-answer] == -100).all()
        assert torch.equal(sample["labels"][-answer:], sample["answer_ids"])
    assert seen == {"kitchen", "office"}
    qa2 = build(babilong_folder, tokenizer, num_segments=1, task="qa2", num_samples=1, loss_on="all")
    assert torch.equal(qa2[0]["labels"], qa2[0]["input_ids"])


def test_length_auto_follows_the_segments_and_long_rows_are_counted_skips(babilong_folder, tokenizer, caplog):
    assert nominal_tokens("0k") == 0 and nominal_tokens("4k") == 4096 and nominal_tokens("1M") == 2 ** 20
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        data = build(babilong_folder, tokenizer, num_segments=2, num_samples=3)  # 1024 tokens: "1k"
    assert data.config == "1k" and len(data.samples) == 2  # Bill's story is too long: skipped
    assert "longer than 2 segments of 512 tokens" in caplog.text and "reused" in caplog.text
    assert all(512 < len(data[i]["input_ids"]) <= 1024 for i in range(3))
    with pytest.raises(ValueError, match="no sample fits 1 segments of 512 tokens"):
        build(babilong_folder, tokenizer, num_segments=1, length="1k")
    with pytest.raises(ValueError, match="task='qa21' is not a bAbI task split"):
        build(babilong_folder, tokenizer, num_segments=1, task="qa21")


@pytest.mark.slow
def test_the_hub_recipe_trains_and_evaluates_on_the_local_copy(babilong_folder, tmp_path):
    from rmt_peft.data.tokenizer import save_offline_tokenizer
    from rmt_peft.tiny_models import save_tiny_model
    from rmt_peft.recipe import load_recipe
    from rmt_peft.train.trainer import run

    backbone = save_tiny_model(str(tmp_path / "tiny-gpt2"), "gpt2", vocab_size=640, max_positions=256)
    save_offline_tokenizer(backbone)
    recipe = load_recipe("babilong_hub_qa1", [
        f"model.name_or_path={backbone}", "model.dtype=float32", "memory.segment_size=96",
        f"data.options.path={babilong_folder}", "data.num_train_samples=4", "data.num_eval_samples=2",
        "curriculum.segments=[1,2]", "eval.num_segments=[1,2]", "eval.num_samples=2", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1", "training.eval_steps=1",
        "training.save_steps=2", "training.bf16=false", "training.report_to=none", "training.disable_tqdm=true",
        f"training.output_dir={tmp_path / 'run'}"])
    summary = run(recipe, log=lambda *_: None)
    assert set(summary["eval"]) == {"1", "2"}
    assert all(0 <= m["accuracy"] <= 1 and m["loss"] > 0 for m in summary["eval"].values())
