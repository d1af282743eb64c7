"""Lean data from other sources (rmt_peft/data/lean_import.py): miniCTX files and theorem records
(JSON or JSONL, with presets and premises) to theorems.jsonl + lemmas.jsonl that the lean task reads.
LeanDojo's import and the task itself are tests/data/test_lean.py's."""
import json

import pytest

from rmt_peft.data.lean import main
from rmt_peft.data.lean_import import declarations, import_records

from .test_lean import build, encode, read_jsonl
from .tokens import find




def test_minictx_import(tmp_path, tokenizer):
    context = ("import Mathlib.Data.Real.Basic\n\ndef s (x : ℝ) : ℝ := x * x\n\n"
               "@[simp] lemma s_zero : s 0 = 0 := by\n  simp [s]\n\ntheorem unused_thm (x : ℝ) : x = x := rfl\n\n")
    entries = [
        {"srcContext": context, "theoremStatement": "lemma s_eq_pow_two {x : ℝ} : s x = x ^ 2",
         "theoremName": "s_eq_pow_two", "file": "Square.lean",
         "proofMetadata": {"hasProof": True, "proof": "by\n  rw [s, pow_two]", "proofType": "tactic"}},
        {"srcContext": "", "theoremStatement": "lemma open_problem : False", "theoremName": "open_problem",
         "file": "Open.lean", "proofMetadata": {"hasProof": False}},
    ]
    (tmp_path / "mathlib.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\nnot json\n")
    assert main(["import-minictx", str(tmp_path / "mathlib.jsonl"), str(tmp_path / "out")]) == 0
    pool = {x["name"]: x["statement"] for x in read_jsonl(tmp_path / "out" / "lemmas.jsonl")}
    assert pool == {"Square.lean:s": "def s (x : ℝ) : ℝ := x * x",
                    "Square.lean:s_zero": "@[simp] lemma s_zero : s 0 = 0 := by\n  simp [s]",
                    "Square.lean:unused_thm": "theorem unused_thm (x : ℝ) : x = x := rfl"}
    (theorem,) = read_jsonl(tmp_path / "out" / "theorems.jsonl")
    assert theorem == {"name": "s_eq_pow_two", "statement": "lemma s_eq_pow_two {x : ℝ} : s x = x ^ 2",
                       "proof": "by\n  rw [s, pow_two]", "lemmas": ["Square.lean:s"]}
    data = build(tokenizer, segment_size=96, num_segments=1, num_samples=1,
                 theorems=str(tmp_path / "out" / "theorems.jsonl"), lemmas=str(tmp_path / "out" / "lemmas.jsonl"))
    assert find(data[0]["input_ids"], encode(tokenizer, "\n" + pool["Square.lean:s"]))



@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_records_import_with_presets_and_premises(tmp_path, layout):
    records = [
        {"name": "t1", "formal_statement": "theorem t1 (a : ℕ) : a + 0 = a", "proof": "by simp"},
        {"name": "t2", "formal_statement": "theorem t2 (a b : ℕ) : a + b = b + a", "formal_proof": "by omega"},
        {"name": "t3", "formal_statement": "theorem t3 : True"},  # no proof: skipped
    ]
    path = tmp_path / f"workbook.{layout}"
    path.write_text(json.dumps(records) if layout == "json" else "\n".join(json.dumps(r) for r in records))
    assert main(["import-records", str(path), str(tmp_path / "wb"), "--preset", "workbook"]) == 0
    theorems = read_jsonl(tmp_path / "wb" / "theorems.jsonl")
    assert [(t["name"], t["proof"], t["lemmas"]) for t in theorems] == [("t1", "by simp", []), ("t2", "by omega", [])]
    assert {x["name"] for x in read_jsonl(tmp_path / "wb" / "lemmas.jsonl")} == {"t1", "t2"}

    plain = [{"name": "uses", "statement": "theorem uses : 1 + 1 = 2", "proof": "by rw [two_eq]",
              "premises": [{"name": "two_eq", "statement": "theorem two_eq : 2 = 1 + 1"}, "t_other"]},
             {"name": "t_other", "statement": "theorem t_other : 0 = 0", "proof": "rfl", "premises": []}]
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in plain))
    assert import_records(str(tmp_path / "plain.jsonl"), str(tmp_path / "p")) == (2, 3)
    assert read_jsonl(tmp_path / "p" / "theorems.jsonl")[0]["lemmas"] == ["two_eq", "t_other"]
    with pytest.raises(ValueError, match="preset='x' is not known"):
        import_records(str(path), str(tmp_path / "x"), preset="x")


def test_declarations_are_cut_at_the_next_one():
    source = ("import Mathlib\n\n/-- doc -/\ntheorem a (x : ℕ) : x = x := rfl\n\n"
              "@[simp] lemma b : 1 = 1 := by\n  rfl\n\nnoncomputable def c : ℕ := 0\n")
    assert list(declarations(source)) == [("a", "theorem a (x : ℕ) : x = x := rfl"),
                                          ("b", "@[simp] lemma b : 1 = 1 := by\n  rfl"),
                                          ("c", "noncomputable def c : ℕ := 0")]
    assert list(declarations("-- nothing declared\n")) == []
