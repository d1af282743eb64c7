"""The data registry (rmt_peft/data/registry.py): task names, samples of the requested segments for every
task, options checked by name, the Hub datasets a model card names."""
import pytest
import torch

from rmt_peft.data.registry import MEMORY_TASKS, TASKS, build_dataset, hub_datasets, validate_options


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


def test_a_model_card_names_the_hub_datasets_the_options_read():
    assert hub_datasets({"noise": "quality"}) == ["tasksource/QuALITY"]
    assert hub_datasets({"path": "json", "data_files": "qa.jsonl"}) == []  # a datasets builder, local files
    assert hub_datasets({"noise": {"source": "quality"}, "document": {"path": "me/docs", "split": "train"}}) == [
        "me/docs", "tasksource/QuALITY"]
    assert hub_datasets({"document": {"path": "./local/docs"}, "noise": "generated"}) == []
