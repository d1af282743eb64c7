import logging
from collections import Counter

import pytest
import torch

from rmt_peft.data.arxiv_lm import ArxivLMOptions, HistoryLMDataset
from rmt_peft.data.noise import GeneratedText

from .tokens import find

SEGMENT = 32


def build(tokenizer, num_segments=3, num_samples=12, **options):
    return HistoryLMDataset(ArxivLMOptions(**options), tokenizer=tokenizer, segment_size=SEGMENT,
                            num_segments=num_segments, num_samples=num_samples, seed=0)


def document_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def locate(sample, documents):
    """(document, first segment index) of the sample inside the independently tokenized documents."""
    places = [(d, start) for d, doc in enumerate(documents) for start in find(doc, sample["input_ids"])]
    assert places, "the sample is not a window of any document"
    d, start = places[0]
    assert start % SEGMENT == 0  # segment-aligned: non-overlapping segments of the document
    return d, start // SEGMENT


def test_target_after_its_history_labels_on_target_only(tokenizer):
    data = build(tokenizer, num_segments=4, num_samples=20)
    documents = [document_ids(tokenizer, GeneratedText()[i]) for i in range(5)]
    targets = set()
    for i in range(20):
        sample = data[i]
        assert sample["input_ids"].shape == (4 * SEGMENT,) and sample["input_ids"].dtype == torch.long
        d, first = locate(sample, documents)
        targets.add((d, first + 3))
        assert (sample["labels"][:3 * SEGMENT] == -100).all()
        assert torch.equal(sample["labels"][3 * SEGMENT:], sample["input_ids"][3 * SEGMENT:])
    assert len(targets) == 20  # distinct targets


def test_mixed_history_sizes(tokenizer):
    data = build(tokenizer, num_segments=4, num_samples=40, history_sizes=[0, 1, 3])
    documents = [document_ids(tokenizer, GeneratedText()[i]) for i in range(5)]
    seen = Counter()
    for i in range(40):
        sample = data[i]
        history = len(sample["input_ids"]) // SEGMENT - 1
        seen[history] += 1
        d, first = locate(sample, documents)
        assert first + history >= 3  # every target has the largest history available before it
        assert (sample["labels"][:history * SEGMENT] == -100).all()
        assert (sample["labels"][history * SEGMENT:] != -100).all()
    assert set(seen) == {0, 1, 3}
    with pytest.raises(ValueError, match="history_sizes=\\[5\\] allow at most num_segments - 1 = 3"):
        build(tokenizer, num_segments=4, history_sizes=[5])
    with pytest.raises(ValueError, match="history_sizes=\\[\\] must be a non-empty list"):
        ArxivLMOptions(history_sizes=[])


def test_bad_documents_are_counted_skips(tmp_path, tokenizer, caplog):
    long_text = " ".join(["The old river crossed the quiet stone."] * 40)
    (tmp_path / "1_good.txt").write_text(long_text)
    (tmp_path / "2_empty.txt").write_text("")
    (tmp_path / "3_short.txt").write_text("A short note.")
    (tmp_path / "4_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        data = build(tokenizer, num_segments=2, num_samples=10,
                     documents={"source": "files", "files": str(tmp_path / "*.txt")})
    segments = len(document_ids(tokenizer, long_text)) // SEGMENT
    assert len(data.documents) == 1 and len(data.targets) == segments - 1  # every segment after the first
    assert "empty document" in caplog.text and "shorter than max(history) + 1 = 2 segments" in caplog.text
    assert "not valid UTF-8" in caplog.text and "targets are reused" in caplog.text
    sample = data[9]  # reused targets still give whole samples
    assert sample["input_ids"].shape == (2 * SEGMENT,)
    with pytest.raises(ValueError, match="no document has 12 segments.*shorter than"):
        build(tokenizer, num_segments=12, documents={"source": "files", "files": str(tmp_path / "*.txt")})


def test_reads_only_the_documents_it_needs_from_a_local_dataset(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(" ".join(["The cold wind crossed the bridge."] * 60) for _ in range(50)))
    data = build(tokenizer, num_segments=2, num_samples=6,
                 documents={"source": "dataset", "path": "text", "data_files": str(path)})
    assert len(data.documents) == 1  # one line (13 segments) holds 6 targets: the stream was not read further
    assert data[0]["input_ids"].shape == (2 * SEGMENT,)


def test_generated_documents_differ_between_dataset_seeds(tokenizer):
    documents = [document_ids(tokenizer, GeneratedText()[i]) for i in range(5)]
    other = HistoryLMDataset(ArxivLMOptions(), tokenizer=tokenizer, segment_size=SEGMENT, num_segments=2,
                             num_samples=5, seed=1)
    for i in range(5):
        assert not any(find(doc, other[i]["input_ids"]) for doc in documents)


@pytest.mark.parametrize("history_tokens", [0, 20, 48])
def test_plain_context_samples_put_history_tokens_before_a_target_on_the_grid(tokenizer, history_tokens):
    # The plain-context baseline: one window of history_tokens + a SEGMENT-token target.
    data = HistoryLMDataset(ArxivLMOptions(history_tokens=history_tokens), tokenizer=tokenizer,
                            segment_size=SEGMENT + history_tokens, num_segments=1, num_samples=12, seed=0)
    documents = [document_ids(tokenizer, GeneratedText()[i]) for i in range(5)]
    for i in range(12):
        sample = data[i]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == (SEGMENT + history_tokens,)
        d, start = next((d, s) for d, doc in enumerate(documents) for s in find(doc, ids.tolist()))
        assert (start + history_tokens) % SEGMENT == 0  # the target is a segment of the memory model's grid
        assert (labels[:history_tokens] == -100).all() and torch.equal(labels[history_tokens:], ids[history_tokens:])
    with pytest.raises(ValueError, match="needs num_segments=1"):
        HistoryLMDataset(ArxivLMOptions(history_tokens=8), tokenizer=tokenizer, segment_size=40, num_segments=2,
                         num_samples=1)
    with pytest.raises(ValueError, match="exclude each other"):
        ArxivLMOptions(history_tokens=8, history_sizes=[1])
