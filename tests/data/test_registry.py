import pytest
import torch
from transformers import AutoTokenizer

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.data.collate import collate
from rmt_peft.data.registry import MEMORY_TASKS, TASKS, build_dataset, validate_options
from rmt_peft.data.tokenizer import offline_vocabulary, save_offline_tokenizer
from rmt_peft.tiny_models import tiny_model

def test_task_names():
    assert set(TASKS) == {"token_memory", "babilong_memorize", "babilong_detect", "babilong_reasoning", "arxiv_lm",
                          "lean", "babilong_hub", "associative_retrieval"}
    assert set(MEMORY_TASKS) == {"token_memory", "babilong_memorize", "babilong_detect", "babilong_reasoning",
                                 "babilong_hub", "associative_retrieval"}


# babilong_hub reads the Hub by default: tests/data/test_babilong_hub.py runs it on a local copy.
@pytest.mark.parametrize("task", sorted(set(TASKS) - {"babilong_hub"}))
@pytest.mark.parametrize("num_segments", [1, 3])
def test_every_task_gives_samples_of_the_requested_segments(tokenizer, task, num_segments):
    segment_size = 96
    data = build_dataset(task, {}, tokenizer=tokenizer, segment_size=segment_size, num_segments=num_segments,
                         num_samples=4, seed=0)
    assert len(data) == 4
    for i in range(4):
        sample = data[i]
        for value in sample.values():
            assert value.dtype == torch.long and value.dim() == 1
        length = len(sample["input_ids"])
        if task == "lean":
            assert (num_segments - 1) * segment_size < length <= num_segments * segment_size
        else:
            assert length == num_segments * segment_size
        assert sample["attention_mask"].shape == sample["labels"].shape == (length,)
        if task in MEMORY_TASKS:
            labelled = sample["labels"] != -100
            assert torch.equal(sample["answer_ids"], sample["labels"][labelled])
            assert labelled[-len(sample["answer_ids"]):].all() and labelled.sum() == len(sample["answer_ids"])
        else:
            assert "answer_ids" not in sample


def test_options_are_validated_with_names_and_allowed_values(tokenizer):
    with pytest.raises(ValueError, match="task='babi' is not known; allowed: \\('token_memory'"):
        validate_options("babi", {})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['reasoning_kind'\]; allowed: \('noise', 'loss_on', "
                                         r"'babi_file', 'babi_facts'\)"):
        validate_options("babilong_memorize", {"reasoning_kind": "relations"})
    with pytest.raises(ValueError, match="reasoning_kind='chain' is not allowed; allowed: \\('relations', 'object_location'\\)"):
        validate_options("babilong_reasoning", {"reasoning_kind": "chain"})
    with pytest.raises(ValueError, match="num_values=0 must be an integer >= 1"):
        validate_options("token_memory", {"num_values": 0})
    with pytest.raises(ValueError, match="segment_size=0 must be an integer >= 1"):
        build_dataset("arxiv_lm", {}, tokenizer=tokenizer, segment_size=0, num_segments=1, num_samples=1, seed=0)
    with pytest.raises(ValueError, match="'lean' needs a tokenizer"):
        build_dataset("lean", None, tokenizer=None, segment_size=8, num_segments=1, num_samples=1, seed=0)
    assert len(build_dataset("token_memory", None, tokenizer=None, segment_size=8, num_segments=2, num_samples=3,
                             seed=0)[0]["input_ids"]) == 16


def test_collate_pads_each_key_with_its_own_value():
    a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
         "labels": torch.tensor([-100, 6, 7]), "answer_ids": torch.tensor([6, 7])}
    b = {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
         "labels": torch.tensor([8]), "answer_ids": torch.tensor([8])}
    right = collate([a, b], pad_token_id=9)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["answer_ids"].tolist() == [[6, 7], [8, -100]]
    left = collate([a, b], pad_token_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["answer_ids"].tolist() == [[6, 7], [8, -100]]  # answers stay left-aligned
    with pytest.raises(ValueError, match="padding_side='middle' is not allowed; allowed: \\('right', 'left'\\)"):
        collate([a], padding_side="middle")


def test_offline_tokenizer_saves_next_to_a_tiny_model(tmp_path, tokenizer):
    assert len(tokenizer) == len(offline_vocabulary()) and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    text = "Mary went to the kitchen. Where is Mary? kitchen Zyx ⊢"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # unknown words fall back to characters
    assert tokenizer.convert_ids_to_tokens(ids[:6]) == ["Mary", "went", "to", "the", "kitchen", "."]
    assert tokenizer.decode(ids) == text
    save_offline_tokenizer(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    # the samples feed the recurrent model segment by segment, with a loss on the answer only
    data = build_dataset("babilong_detect", {}, tokenizer=loaded, segment_size=32, num_segments=3, num_samples=2, seed=0)
    batch = collate([data[0], data[1]], pad_token_id=loaded.pad_token_id)
    rmt = RMTModel(tiny_model("gpt2", vocab_size=len(loaded), max_positions=64),
                   MemoryConfig(num_memory_tokens=2, segment_size=32))
    out = rmt(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss) and out.segment_token_counts is not None
    assert [int(c) for c in out.segment_token_counts] == [0, 0, 2 * len(data[0]["answer_ids"])]
