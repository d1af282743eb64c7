"""The raw-token memory task (rmt_peft/data/token_memory.py): [FACT, value, noise...] opens the first
segment, [..., QUESTION, value] closes the last, only the answer is labelled, samples are fixed by
their seed and index."""
import pytest
import torch

from rmt_peft.data.token_memory import TokenMemoryTask

FACT, QUESTION, FIRST_VALUE = 2, 3, 4  # written out here, not taken from the module


def test_a_sample_holds_the_value_at_both_ends_and_labels_only_the_answer():
    task = TokenMemoryTask(num_samples=50, num_segments=3, segment_size=8, num_values=5, vocab_size=32, seed=1)
    assert len(task) == 50
    values = set()
    for i in range(len(task)):
        sample = task[i]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == labels.shape == sample["attention_mask"].shape == (24,)
        value = int(ids[1])
        assert (int(ids[0]), int(ids[-2]), int(ids[-1])) == (FACT, QUESTION, value)
        assert FIRST_VALUE <= value < FIRST_VALUE + 5
        assert bool((ids[2:-2] >= FIRST_VALUE + 5).all() and (ids < 32).all())  # noise: never a marker or a value
        assert labels[:-1].eq(-100).all() and int(labels[-1]) == value
        assert sample["attention_mask"].eq(1).all()
        values.add(value)
    assert values == set(range(FIRST_VALUE, FIRST_VALUE + 5))  # every value turns up in 50 samples


def test_samples_are_fixed_by_seed_and_index():
    a, b = TokenMemoryTask(4, 2, 8, seed=3), TokenMemoryTask(4, 2, 8, seed=3)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(4))
    assert not torch.equal(a[0]["input_ids"], TokenMemoryTask(4, 2, 8, seed=4)[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])


def test_sizes_that_cannot_hold_the_task_are_refused():
    with pytest.raises(ValueError, match=r"segment_size=3 is too small for fact \+ question \(need >= 2, or 4 in one"):
        TokenMemoryTask(1, 1, 3)
    with pytest.raises(ValueError, match="segment_size=1 is too small"):
        TokenMemoryTask(1, 2, 1)
    TokenMemoryTask(1, 2, 2)  # fact and question in segments of their own
    with pytest.raises(ValueError, match=r"vocab_size=14 leaves no noise tokens; need > 14"):
        TokenMemoryTask(1, 2, 8, num_values=10, vocab_size=14)
