"""Counted skips of bad input (rmt_peft/data/skips.py): logged at the 1st, 2nd, 4th, 8th, ... of each
reason, summed up for error messages; bad JSONL lines are skips, not crashes."""
import logging

from rmt_peft.data.skips import SkipCounter, json_lines


def test_each_reason_is_logged_at_powers_of_two_and_summed_up(caplog):
    skips = SkipCounter("corpus.txt")
    assert skips.summary() == "corpus.txt: nothing skipped" and skips.total == 0
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        for i in range(1, 10):
            skips.skip("empty document", f"line {i}")
        skips.skip("not UTF-8")
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"corpus.txt: skipped {n} record(s) so far: empty document (latest: line {n})" for n in (1, 2, 4, 8)] \
        + ["corpus.txt: skipped 1 record(s) so far: not UTF-8"]
    assert skips.total == 10
    assert skips.summary() == "corpus.txt: skipped 9 (empty document), 1 (not UTF-8)"


def test_bad_jsonl_lines_are_counted_and_the_good_ones_kept_with_their_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n\n[1, 2]\nnot json\n{"b": "\xff"}\n' + '{"c": "é"}\n'.encode())
    skips = SkipCounter("data.jsonl")
    assert list(json_lines(str(path), "record", skips)) == [(1, {"a": 1}), (6, {"c": "é"})]
    assert dict(skips.counts) == {"record line is not a JSON object": 1, "record line is not JSON": 1,
                                  "record line is not valid UTF-8": 1}
