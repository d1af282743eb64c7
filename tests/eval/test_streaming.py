"""Reading a long input in constant memory, then scoring its end (rmt_peft/eval/streaming.py): the
streamed memory and the tail's logits equal those of one forward over the whole input."""
import pytest
import torch

from rmt_peft.eval.streaming import stream_memory, tail_logits

from .test_memory_tasks import make_rmt


@pytest.mark.parametrize("alignment,length", [("left", 29), ("right", 29), ("left", 32)])
@torch.no_grad()
def test_tail_logits_equal_the_whole_input_forward(alignment, length):
    rmt = make_rmt(alignment)
    ids = torch.randint(14, 128, (2, length), generator=torch.Generator().manual_seed(0))
    direct = rmt(ids).logits
    for first_scored in (length - 2, length - 10):
        logits, split = tail_logits(rmt, ids, first_scored, chunk_size=5)
        assert split <= first_scored and split > 0
        torch.testing.assert_close(logits, direct[:, split:], atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("alignment, length", [("left", 24), ("right", 21)])
@torch.no_grad()
def test_the_streamed_memory_is_the_memory_after_one_forward(alignment, length):
    rmt = make_rmt(alignment)
    ids = torch.randint(14, 128, (2, length), generator=torch.Generator().manual_seed(3))
    expected = rmt(ids).memory
    for chunk_size in (None, 3, 8):
        torch.testing.assert_close(stream_memory(rmt, ids, chunk_size), expected, atol=1e-5, rtol=1e-4)
    assert stream_memory(rmt, ids[:, :0]) is None  # nothing read: the forward starts from the learned memory


def test_a_left_aligned_context_must_be_whole_segments():
    with pytest.raises(ValueError, match="the context of 12 tokens is not a whole number of 8-token segments"):
        stream_memory(make_rmt("left"), torch.ones(1, 12, dtype=torch.long))
