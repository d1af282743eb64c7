import logging
import random

import pytest
import torch

from rmt_peft.data.babilong import OBJECTS, PEOPLE, PLACES
from rmt_peft.data.noise import (NOISE_WORDS, PRESETS, DatasetText, FileText, GeneratedText, NoiseStream,
                                 TextSourceOptions, take, text_source)
from rmt_peft.data.registry import build_dataset


def test_generated_noise_never_uses_fact_words():
    fact_words = {w.lower() for w in PEOPLE + PLACES + OBJECTS} | {"north", "south", "east", "west", "is"}
    text = " ".join(GeneratedText(seed=3)[i] for i in range(5))
    words = {w.strip(".").lower() for w in text.split()}
    assert not words & fact_words
    assert words <= {w.lower() for group in NOISE_WORDS.values() for w in group}
    assert GeneratedText(seed=3)[4] == GeneratedText(seed=3)[4] != GeneratedText(seed=4)[4]


def test_take_returns_exact_counts_and_keeps_leftovers():
    chunks = iter([torch.arange(0, 5), torch.arange(5, 12), torch.arange(12, 30)])
    carry = []
    first = torch.cat(list(take(chunks, 7, carry)))
    second = torch.cat(list(take(chunks, 9, carry)))
    assert first.tolist() == list(range(7)) and second.tolist() == list(range(7, 16))
    assert list(take(chunks, 0, carry)) == []


def test_file_source_skips_empty_and_non_utf8_files(tmp_path, tokenizer, caplog):
    (tmp_path / "a.txt").write_text("The old river crossed the quiet stone. " * 20)
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_bytes(b"bright lamp \xff\xfe\xfd broken")
    source = FileText(str(tmp_path / "*.txt"))
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        assert list(source.iter_documents()) == [(tmp_path / "a.txt").read_text(), ""]
        stream = NoiseStream(source, tokenizer)
        tokens = torch.cat(list(take(stream.chunks(random.Random(0)), 500, [])))
    assert len(tokens) == 500
    assert set(tokenizer.decode(tokens).replace(".", " ").split()) <= {"The", "old", "river", "crossed", "the", "quiet",
                                                                       "stone"}
    assert "not valid UTF-8" in caplog.text and "c.txt: byte 12" in caplog.text
    assert source.skips.counts["not valid UTF-8"] == 1  # counted once although the noise cycles past it
    assert "empty document" in caplog.text


def test_noise_without_any_token_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("   \n")
    (tmp_path / "b.txt").write_bytes(b"\xff")
    stream = NoiseStream(FileText(str(tmp_path / "*.txt")), tokenizer)
    with pytest.raises(ValueError, match="without any token.*empty document.*not valid UTF-8"):
        next(stream.chunks(random.Random(0)))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        FileText(str(tmp_path / "*.missing"))


@pytest.mark.parametrize("streaming", [True, False])
def test_dataset_source_reads_local_text_files(tmp_path, streaming):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\nthird line\n")
    source = text_source(TextSourceOptions(source="dataset", path="text", data_files=str(path), streaming=streaming))
    assert isinstance(source, DatasetText)
    assert list(source.iter_documents()) == ["first line", "", "second line", "third line"]
    assert len(source) == 4 and source[2] == "second line"


def test_memory_task_noise_from_a_local_dataset(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("\n".join(["A cold wind crossed the bridge."] * 30))
    data = build_dataset("babilong_memorize", {"noise": {"source": "dataset", "path": "text", "data_files": str(path)}},
                         tokenizer=tokenizer, segment_size=32, num_segments=2, num_samples=2, seed=0)
    sample = data[1]
    fact_and_qa = len(tokenizer(" " + data.story(1).facts[0], add_special_tokens=False)["input_ids"])
    noise = sample["input_ids"][fact_and_qa:-len(sample["answer_ids"]) - 4]
    assert set(tokenizer.decode(noise).replace(".", " ").split()) <= {"A", "cold", "wind", "crossed", "the", "bridge"}


def test_source_specs_are_validated():
    assert TextSourceOptions.parse("pg19", "noise").path == PRESETS["pg19"][0]
    assert TextSourceOptions.parse("quality", "noise").text_field == "article"
    override = TextSourceOptions.parse({"source": "pg19", "split": "test", "pool_size": 8}, "noise")
    assert (override.source, override.path, override.split, override.pool_size) == ("dataset", PRESETS["pg19"][0], "test", 8)
    with pytest.raises(ValueError, match="noise='books' is not known; allowed: 'generated', a preset"):
        TextSourceOptions.parse("books", "noise")
    with pytest.raises(ValueError, match=r"noise: unknown option\(s\) \['colour'\]; allowed: \('source'"):
        TextSourceOptions.parse({"source": "generated", "colour": 1}, "noise")
    with pytest.raises(ValueError, match="source='web' is not known; allowed: \\('generated', 'files', 'dataset'\\)"):
        TextSourceOptions(source="web")
    with pytest.raises(ValueError, match="needs files="):
        TextSourceOptions(source="files")


@pytest.mark.parametrize("streaming", [True, False])
def test_dataset_source_non_utf8_is_a_clear_error_or_replaced_on_request(tmp_path, streaming):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\nbad \xff\xfe line\n")
    options = {"source": "dataset", "path": "text", "data_files": str(path), "streaming": streaming}
    with pytest.raises(ValueError, match="UTF-8.*load_kwargs: {encoding_errors: replace}"):
        list(text_source(TextSourceOptions(**options)).iter_documents())
    replaced = text_source(TextSourceOptions(**options, load_kwargs={"encoding_errors": "replace"}))
    assert list(replaced.iter_documents()) == ["good line", "bad \ufffd\ufffd line"]
