import json
import logging

import pytest
import torch

from rmt_peft.data.lean import (EXAMPLE_LEMMAS, EXAMPLE_THEOREMS, LeanDataset, LeanOptions, generated_lean,
                                import_leandojo, main)

from .tokens import find


def build(tokenizer, segment_size=64, num_segments=3, num_samples=10, **options):
    return LeanDataset(LeanOptions(**options), tokenizer=tokenizer, segment_size=segment_size,
                       num_segments=num_segments, num_samples=num_samples, seed=0)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("num_segments", [2, 4])
def test_statement_lemmas_in_random_order_then_proof(tokenizer, num_segments):
    segment = 96
    theorems = {t["name"]: t for t in read_jsonl(EXAMPLE_THEOREMS)}
    pool = {lemma["name"]: lemma["statement"] for lemma in read_jsonl(EXAMPLE_LEMMAS)}
    data = build(tokenizer, segment_size=segment, num_segments=num_segments, num_samples=12)
    orders = set()
    for i in range(12):
        sample, layout = data[i], data.layout(i)
        x = sample["input_ids"]
        assert (num_segments - 1) * segment < len(x) <= num_segments * segment  # exactly num_segments segments
        theorem = theorems[layout.theorem.name]
        statement, proof = encode(tokenizer, theorem["statement"]), encode(tokenizer, "\n\n" + theorem["proof"])
        assert x[:len(statement)].tolist() == statement and x[len(x) - len(proof):].tolist() == proof
        found = {name: find(x, encode(tokenizer, "\n" + pool[name])) for name in pool}
        present = {name for name, places in found.items() if places}
        assert set(theorem["lemmas"]) <= present  # every lemma the proof uses
        assert len(present) > len(theorem["lemmas"])  # plus irrelevant ones
        orders.add(tuple(found[name][0] < found[other][0] for name in theorem["lemmas"] for other in present
                         if other != name))
        assert torch.equal(sample["labels"], x)
    assert len(orders) > 1  # relevant lemmas are not always in the same place


def test_loss_on_proof_only(tokenizer):
    data = build(tokenizer, loss_on="proof", num_samples=3)
    for i in range(3):
        sample, theorem = data[i], data.layout(i).theorem
        proof = len(encode(tokenizer, "\n\n" + theorem.proof))
        assert (sample["labels"][:-proof] == -100).all()
        assert torch.equal(sample["labels"][-proof:], sample["input_ids"][-proof:])


def test_missing_lemmas_skip_or_error(tmp_path, tokenizer, caplog):
    theorems = tmp_path / "theorems.jsonl"
    good = read_jsonl(EXAMPLE_THEOREMS)[0]
    theorems.write_text("\n".join([
        json.dumps(good),
        json.dumps({**good, "name": "uses_unknown", "lemmas": ["Nat.add_zero", "Nope.not_in_pool"]}),
        "{not json",
        json.dumps({"name": "no_proof", "statement": "theorem x : True", "lemmas": []}),
    ]))
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        data = build(tokenizer, theorems=str(theorems), num_samples=4)
    assert {data.layout(i).theorem.name for i in range(4)} == {good["name"]}
    for reason in ("lemma names missing from the pool", "not JSON", "without non-empty 'statement'", "kept 1 theorems"):
        assert reason in caplog.text
    with pytest.raises(ValueError, match="uses_unknown.*missing from the pool: \\['Nope.not_in_pool'\\]"):
        build(tokenizer, theorems=str(theorems), missing_lemmas="error")
    with pytest.raises(ValueError, match="missing_lemmas='maybe' is not allowed; allowed: \\('skip', 'error'\\)"):
        LeanOptions(missing_lemmas="maybe")


def test_pool_too_small_or_theorem_too_long_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="lemma pool .* fills only .* tokens"):
        build(tokenizer, segment_size=256, num_segments=20)
    with pytest.raises(ValueError, match="no theorem fits num_segments \\* segment_size = 8 tokens"):
        build(tokenizer, segment_size=8, num_segments=1)


def leandojo_files(tmp_path):
    def tactic(text, premises):
        return {"tactic": text, "state_before": "a b : ℕ\n⊢ a + 0 + b = b + a", "state_after": "no goals",
                "annotated_tactic": [text, [{"full_name": p, "def_path": "Nat.lean", "def_pos": [1, 1],
                                             "def_end_pos": [1, 9]} for p in premises]]}
    benchmark = [
        {"full_name": "add_zero_comm", "file_path": "Foo.lean", "start": [1, 1], "end": [3, 1],
         "traced_tactics": [tactic("rw [Nat.add_zero]", ["Nat.add_zero"]), tactic("exact Nat.add_comm b a", ["Nat.add_comm"])]},
        {"full_name": "untraced", "file_path": "Foo.lean", "traced_tactics": []},
    ]
    corpus = [{"path": "Nat.lean", "imports": [], "premises": [
        {"full_name": lemma["name"], "code": lemma["statement"], "kind": "commanddeclaration"}
        for lemma in read_jsonl(EXAMPLE_LEMMAS)]}]
    (tmp_path / "train.json").write_text(json.dumps(benchmark))
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(c) for c in corpus))
    return str(tmp_path / "train.json"), str(tmp_path / "corpus.jsonl")


def test_leandojo_import(tmp_path, tokenizer, capsys):
    benchmark, corpus = leandojo_files(tmp_path)
    assert main(["import-leandojo", benchmark, corpus, str(tmp_path / "out")]) == 0
    assert "wrote 1 theorems" in capsys.readouterr().out
    (theorem,) = read_jsonl(tmp_path / "out" / "theorems.jsonl")
    assert theorem == {"name": "add_zero_comm", "statement": "theorem add_zero_comm\na b : ℕ\n⊢ a + 0 + b = b + a",
                       "proof": "by\n  rw [Nat.add_zero]\n  exact Nat.add_comm b a",
                       "lemmas": ["Nat.add_zero", "Nat.add_comm"]}
    assert import_leandojo(benchmark, corpus, str(tmp_path / "out2")) == (1, len(read_jsonl(EXAMPLE_LEMMAS)))
    data = build(tokenizer, theorems=str(tmp_path / "out" / "theorems.jsonl"),
                 lemmas=str(tmp_path / "out" / "lemmas.jsonl"), num_samples=2)
    x = data[1]["input_ids"].tolist()
    statement, proof = encode(tokenizer, theorem["statement"]), encode(tokenizer, "\n\n" + theorem["proof"])
    assert x[:len(statement)] == statement and x[-len(proof):] == proof


def test_generated_lean_fills_every_stage_of_the_lean_recipe(tokenizer):
    # recipes/lean_gptneo_1.3b.yaml: segments of 2028 tokens, stages of 1..4 segments (eval to 8).
    pool, theorems = generated_lean(400)
    assert len(pool) == 400 and len(theorems) == 100
    assert all(set(t.lemmas) <= set(pool) and all(n in t.proof for n in t.lemmas) for t in theorems)
    assert all(s.startswith(f"theorem {n} (") and " : ℕ) : " in s for n, s in pool.items())
    assert generated_lean(400) == (pool, theorems)  # deterministic
    data = build(tokenizer, segment_size=2028, num_segments=4, num_samples=3, theorems="generated",
                 lemmas="generated")
    for i in range(3):
        x, theorem = data[i]["input_ids"], data.layout(i).theorem
        assert 3 * 2028 < len(x) <= 4 * 2028
        for name in theorem.lemmas:  # the lemmas the proof rewrites with are in the context
            assert find(x, encode(tokenizer, "\n" + data.pool[name]))
    with pytest.raises(ValueError, match="use 'generated' for both"):
        LeanOptions(theorems="generated")


def test_pool_too_small_names_the_shortfall(tokenizer):
    with pytest.raises(ValueError, match=r"\(42 lemmas\) fills only \d+ tokens, \d+ short of the 6085 needed "
                                         r"for 4 segments of 2028"):
        build(tokenizer, segment_size=2028, num_segments=4)


