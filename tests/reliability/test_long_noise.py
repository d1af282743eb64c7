"""A noise file of one very long line is not tokenized whole for every sample: each sample
tokenizes only the pieces it takes, from a random point of the document."""
import time

from rmt_peft.data import noise
from rmt_peft.data.registry import build_dataset
from rmt_peft.data.tokenizer import offline_tokenizer


def test_a_long_single_line_document_is_tokenized_in_the_pieces_a_sample_takes(tmp_path, monkeypatch):
    words = " ".join(noise.NOISE_WORDS["nouns"])
    text = (words + " ") * (3 * noise.LONG_DOCUMENT_CHARS // len(words))  # 3M characters, no newline
    (tmp_path / "long.txt").write_text(text)
    encoded = []
    original = noise.encode

    def counting(tokenizer, piece):
        encoded.append(len(piece))
        return original(tokenizer, piece)
    monkeypatch.setattr(noise, "encode", counting)
    start = time.perf_counter()
    data = build_dataset("babilong_memorize", {"noise": {"source": "files", "files": str(tmp_path / "long.txt")}},
                         tokenizer=offline_tokenizer(), segment_size=64, num_segments=4, num_samples=40)
    samples = [data[i]["input_ids"] for i in range(40)]
    elapsed = time.perf_counter() - start
    assert all(len(s) == 256 for s in samples)
    # whole-document tokenization would encode 3M characters per sample; pieces are PIECE_CHARS at most
    assert max(encoded) <= noise.PIECE_CHARS and sum(encoded) < 80 * noise.PIECE_CHARS
    assert elapsed < 30
    # samples start at different places of the document
    assert len({tuple(s[:16].tolist()) for s in samples}) > 10
