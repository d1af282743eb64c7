"""check_inputs (rmt_peft/inputs.py) on its own: each bad argument is a ValueError naming it, and
what is allowed passes (ignored labels, boolean masks, no vocabulary bound). RMTModel's use of it is
tests/reliability/test_model_inputs.py's."""
import pytest
import torch

from rmt_peft.inputs import IGNORE_INDEX, check_inputs

IDS = torch.tensor([[0, 5, 9], [3, 3, 1]])


def test_what_is_allowed_passes():
    check_inputs(IDS, vocab_size=10)
    check_inputs(IDS + 1000)  # no vocabulary bound given
    check_inputs(IDS.to(torch.int32), torch.tensor([[True, True, False], [True, False, False]]),
                 torch.full_like(IDS, IGNORE_INDEX), vocab_size=10)  # nothing to learn: allowed
    check_inputs(IDS, torch.ones_like(IDS), torch.tensor([[-100, 9, 0], [1, -100, 2]]), torch.zeros(2, 4, 8),
                 vocab_size=10, memory_shape=(4, 8))


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": IDS, "vocab_size": 9}, r"input_ids must lie in \[0, 9\) \(the embedding's size\), got values from "
                                          r"0 to 9$"),
    ({"input_ids": IDS - 1}, r"input_ids must lie in \[0, None\) .* from -1 to 8"),
    ({"input_ids": IDS.bool()}, "input_ids must hold integer token ids, got dtype torch.bool"),
    ({"input_ids": IDS, "labels": IDS.float()}, "labels must hold integer token ids"),
    ({"input_ids": IDS, "labels": torch.tensor([[-100, 10, 0], [0, 0, 0]]), "vocab_size": 10},
     r"labels must lie in \[0, 10\) or be -100 \(ignored\), got values from 0 to 10"),
    ({"input_ids": IDS, "labels": torch.tensor([[-1, 1, 0], [0, 0, 0]])}, "labels must lie in .* from -1 to 1"),
    ({"input_ids": IDS, "attention_mask": [[1, 1, 1], [1, 1, 1]]}, "attention_mask must be a torch.Tensor, got list"),
    ({"input_ids": IDS, "memory": torch.zeros(2, 4, 8, dtype=torch.long)}, "memory must be a floating-point"),
    ({"input_ids": IDS, "memory": torch.zeros(1, 4, 8), "memory_shape": (4, 8)},
     r"memory must be \(batch, num_memory_tokens, hidden\) = \(2, 4, 8\), got \(1, 4, 8\)"),
    ({"input_ids": IDS, "memory": torch.full((2, 4, 8), float("nan"))}, "memory holds NaN or infinite values"),
    ({"input_ids": IDS, "labels": IDS, "memory": torch.full((2, 4, 8), float("-inf"))}, "memory holds NaN"),
    ({"input_ids": IDS, "attention_mask": torch.tensor([[1, 0, 1], [1, 1, -1]])}, "attention_mask must hold only 0 and 1"),
    ({"input_ids": IDS, "attention_mask": torch.tensor([[1, 0, 0], [0, 0, 0]])}, "attention_mask is all zero for a sample"),
])
def test_each_bad_argument_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(**kwargs)


def test_a_good_memory_is_not_mistaken_for_a_bad_mask_and_the_reverse():
    """The values are read in one list: the checks must each read their own entry."""
    mask = torch.ones_like(IDS)
    check_inputs(IDS, mask, IDS, torch.zeros(2, 4, 8), vocab_size=10)  # labels and memory: no error
    with pytest.raises(ValueError, match="attention_mask is all zero"):
        check_inputs(IDS, torch.tensor([[1, 1, 1], [0, 0, 0]]), None, torch.zeros(2, 4, 8), vocab_size=10)
    with pytest.raises(ValueError, match="memory holds NaN"):
        check_inputs(IDS, mask, None, torch.full((2, 4, 8), float("nan")), vocab_size=10)
