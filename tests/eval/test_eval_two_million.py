"""The paper's longest input: 4096 segments of 500 tokens (2,048,000 tokens) in flat memory."""
import pytest

from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.eval.memory_tasks import length_generalization
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model


@pytest.mark.slow
def test_two_million_tokens_in_flat_memory_and_linear_time():
    # The smallest backbone that still is a transformer (RoPE: no position table to outgrow).
    rmt = RMTModel(tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2),
                   MemoryConfig(num_memory_tokens=2, segment_size=500))
    points = length_generalization(rmt, lambda n, k: TokenMemoryTask(k, n, 500), [2, 512, 4096],
                                   num_samples=1, progress=False)
    short, middle, full = points
    assert full.num_tokens == 2_048_000
    assert 0.0 <= full.accuracy <= 1.0
    # Whole-input logits alone would be 2,048,000 x 128 x 4 bytes = 1 GiB; the sample itself
    # (input_ids, attention_mask, labels as int64) is 47 MiB and is all that may grow.
    assert full.peak_memory_bytes - short.peak_memory_bytes < 100 * 2**20
    # 8x the tokens: about 8x the time (loose bounds for a shared CPU).
    assert 3 < full.seconds / middle.seconds < 20
