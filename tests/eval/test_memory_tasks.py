"""Memory-task accuracy (rmt_peft/eval/memory_tasks.py) through the streaming path equals a direct
rmt(...) forward."""
import pytest
import torch

from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.eval.memory_tasks import length_generalization
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model


def make_rmt(alignment="left", memory=4, arch="gpt2"):
    config = MemoryConfig(num_memory_tokens=memory, segment_size=8, segment_alignment=alignment,
                          memory_init_std=0.5)
    rmt = RMTModel(tiny_model(arch, seed=1), config)
    torch.manual_seed(2)
    with torch.no_grad():  # non-zero read/write embeddings, so memory really flows
        rmt.read_embedding.normal_(0, 0.3)
        rmt.write_embedding.normal_(0, 0.3)
    return rmt.eval()


@torch.no_grad()
def test_accuracy_matches_direct_predictions():
    rmt = make_rmt()
    task = TokenMemoryTask(num_samples=6, num_segments=3, segment_size=8)
    samples = [task[i] for i in range(6)]
    direct = rmt(torch.stack([s["input_ids"] for s in samples])).logits[:, -2].argmax(-1)
    # Label the answer with the model's own direct prediction for samples 0, 2, 4 and with a
    # different token for 1, 3, 5: the streamed accuracy must then be exactly 1/2.
    for i, sample in enumerate(samples):
        answer = int(direct[i]) if i % 2 == 0 else (int(direct[i]) + 1) % 128
        sample["input_ids"][-1] = answer
        sample["labels"][-1] = answer
    for batch_size in (1, 4):
        points = length_generalization(rmt, lambda n, k: samples[:k], [3], num_samples=6,
                                       batch_size=batch_size, progress=False)
        assert points[0].accuracy == pytest.approx(0.5)
        assert points[0].num_tokens == 24 and points[0].num_samples == 6
        assert points[0].peak_memory_bytes > 0 and points[0].seconds > 0


@torch.no_grad()
def test_answer_ids_override_labels_on_every_token():
    rmt = make_rmt()
    sample = TokenMemoryTask(num_samples=1, num_segments=2, segment_size=8)[0]
    prediction = int(rmt(sample["input_ids"][None]).logits[0, -2].argmax())
    sample["input_ids"][-1] = prediction
    sample["labels"] = sample["input_ids"].clone()  # a loss on all tokens: the random noise is not scored
    sample["answer_ids"] = torch.tensor([prediction])
    points = length_generalization(rmt, lambda n, k: [sample], [2], num_samples=1, progress=False)
    assert points[0].accuracy == 1.0
