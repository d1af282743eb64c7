"""The offline tokenizer (rmt_peft/data/tokenizer.py): the generators' words as whole tokens,
characters as the fallback (never <unk>), the same ids on every machine, saved beside a tiny model
for AutoTokenizer."""
import torch
from transformers import AutoTokenizer

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.data.collate import collate
from rmt_peft.data.registry import build_dataset
from rmt_peft.data.tokenizer import offline_vocabulary, save_offline_tokenizer
from rmt_peft.tiny_models import tiny_model


def test_the_vocabulary_is_specials_then_characters_then_words(tokenizer):
    vocabulary = offline_vocabulary()
    assert vocabulary == offline_vocabulary() and len(set(vocabulary)) == len(vocabulary)
    assert vocabulary[:3] == ["<pad>", "<eos>", "<unk>"]
    characters = vocabulary[3:vocabulary.index("##" + vocabulary[3])]
    assert {"a", "Z", "0", "?", "⊢", "ℕ"} <= set(characters) and all(len(c) == 1 for c in characters)
    assert vocabulary[3 + len(characters):3 + 2 * len(characters)] == ["##" + c for c in characters]
    words = vocabulary[3 + 2 * len(characters):]
    assert words == sorted(words) and {"theorem", "simp", "kitchen", "Mary"} <= set(words)
    # a word of the vocabulary is one token; a Lean keyword too
    for word in ("theorem", "kitchen", "Mary"):
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [vocabulary.index(word)]
    assert tokenizer("qzx", add_special_tokens=False)["input_ids"] == [vocabulary.index(t) for t in ("q", "##z", "##x")]


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
