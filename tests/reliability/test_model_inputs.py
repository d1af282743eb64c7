"""RMTModel.forward / generate reject inputs they cannot process with a ValueError naming the
argument, before any segment runs (no raw torch error, no loss against the wrong positions)."""
import pytest
import torch

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.tiny_models import tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def rmt():
    backbone = tiny_model("gpt_neo", vocab_size=VOCAB, max_positions=64)
    return RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=8), lora=None)


IDS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
ONES = torch.ones_like(IDS)


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": IDS[0]}, "input_ids must be \\(batch, length\\)"),
    ({"input_ids": IDS[:, :0]}, "input_ids is empty"),
    ({"input_ids": IDS.float()}, "input_ids must hold integer"),
    ({"input_ids": IDS.tolist()}, "input_ids must be a torch.Tensor"),
    ({"input_ids": IDS + VOCAB}, "input_ids must lie in \\[0, 64\\)"),
    ({"input_ids": IDS - VOCAB}, "input_ids must lie in \\[0, 64\\)"),
    ({"input_ids": IDS, "labels": IDS[:, :10]}, "labels must have the shape of input_ids"),
    ({"input_ids": IDS, "labels": IDS.float()}, "labels must hold integer"),
    ({"input_ids": IDS, "labels": IDS - 50}, "labels must lie in"),
    ({"input_ids": IDS, "attention_mask": ONES[:, :10]}, "attention_mask must have the shape"),
    ({"input_ids": IDS, "attention_mask": ONES * 2}, "attention_mask must hold only 0 and 1"),
    ({"input_ids": IDS, "attention_mask": torch.stack([ONES[0], 0 * ONES[1]])}, "attention_mask is all zero"),
    ({"input_ids": IDS, "memory": torch.zeros(2, 3, 8)}, "memory must be"),
])
def test_bad_inputs_are_named(rmt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rmt(**kwargs)


def test_good_inputs_pass_and_ignored_labels_are_allowed(rmt):
    labels = IDS.clone()
    labels[:, :5] = -100
    mask = ONES.clone()
    mask[1, 15:] = 0  # right padding
    out = rmt(input_ids=IDS, attention_mask=mask.bool(), labels=labels)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="attention_mask is all zero"):
        rmt.generate(IDS, torch.zeros_like(IDS), max_new_tokens=1)
    assert rmt.generate(IDS, ONES, max_new_tokens=2, do_sample=False).shape == (2, 2)
