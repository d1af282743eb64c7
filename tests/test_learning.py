"""It learns: recall a token seen only in the first segment, through the memory alone."""
import pytest
import torch
from torch.utils.data import DataLoader

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.eval.metrics import exact_match
from rmt_peft.tiny_models import tiny_model

SEGMENT, VOCAB, STEPS, BATCH = 8, 64, 150, 32


def train_curriculum(num_memory_tokens: int) -> RMTModel:
    torch.manual_seed(0)
    backbone = tiny_model("gpt_neo", vocab_size=VOCAB, max_positions=64).train()
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=num_memory_tokens, segment_size=SEGMENT))
    rmt.train()
    optimizer = torch.optim.AdamW(rmt.parameters(), lr=2e-3, weight_decay=0.0)
    for segments in (1, 2, 3):  # the paper's curriculum: one more segment per stage
        data = TokenMemoryTask(STEPS * BATCH, segments, SEGMENT, vocab_size=VOCAB, seed=segments)
        for batch in DataLoader(data, batch_size=BATCH):
            rmt(batch["input_ids"], labels=batch["labels"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return rmt.eval()


def accuracy(rmt: RMTModel, segments: int, samples: int = 256) -> float:
    batch = next(iter(DataLoader(TokenMemoryTask(samples, segments, SEGMENT, vocab_size=VOCAB, seed=999),
                                 batch_size=samples)))
    with torch.no_grad():
        logits = rmt(batch["input_ids"], labels=batch["labels"], return_logits=True).logits
    return exact_match(logits, batch["labels"]).mean().item()


@pytest.mark.slow
def test_memory_learns_and_generalises_while_no_memory_stays_at_chance():
    with_memory = train_curriculum(4)
    assert accuracy(with_memory, 3) >= 0.9
    assert accuracy(with_memory, 8) >= 0.8  # trained on at most 3 segments
    without = train_curriculum(0)
    assert accuracy(without, 3) <= 0.25  # 10 values: chance is 0.1
