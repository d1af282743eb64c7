"""Batching samples of different lengths (rmt_peft/data/collate.py): each key padded with its own
value, on the side asked for (answers always on the right), bad batches named."""
import pytest
import torch

from rmt_peft.data.collate import collate


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


def test_bad_batches_are_named():
    one = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match="collate got an empty batch"):
        collate([])
    with pytest.raises(ValueError, match=r"sample 1 has keys \['input_ids'\], sample 0 has \['input_ids', 'labels'\]"):
        collate([one, {"input_ids": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"collate expects 1-D tensors; 'labels' has shapes \[\(2,\), \(1, 2\)\]"):
        collate([one, {"input_ids": torch.tensor([3]), "labels": torch.tensor([[1, 2]])}])


def test_a_batch_of_equal_lengths_is_stacked_as_it_is():
    rows = [{"input_ids": torch.tensor([i, i + 1]), "labels": torch.tensor([-100, i + 1])} for i in (3, 7)]
    for side in ("right", "left"):
        batch = collate(rows, pad_token_id=0, padding_side=side)
        assert batch["input_ids"].tolist() == [[3, 4], [7, 8]] and batch["labels"].tolist() == [[-100, 4], [-100, 8]]
        assert batch["input_ids"].dtype == torch.long
