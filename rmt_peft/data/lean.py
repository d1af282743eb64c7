"""Lean theorem proving with lemmas in context (the paper's Fig. 9).

A sample is ``[theorem statement][relevant and irrelevant lemmas in random order][proof]``: the
lemmas the proof uses hidden among random others from a lemma pool. Irrelevant lemmas are added
until the sample fills ``num_segments`` segments (more than ``(num_segments - 1) * segment_size``
tokens, at most ``num_segments * segment_size``), so the curriculum over segments is a curriculum
over distractors. Labels cover every token (``loss_on="all"``: perplexity on all tokens and on the
last segment) or the proof only (``"proof"``).

Input files (UTF-8 JSON Lines; the shipped example lives in rmt_peft/data/examples/):

* theorems: ``{"name": "add_zero_comm", "statement": "theorem add_zero_comm ...", "proof": "by ...",
  "lemmas": ["Nat.add_zero", "Nat.add_comm"]}`` per line (``lemmas``: names in the pool);
* lemma pool: ``{"name": "Nat.add_comm", "statement": "theorem Nat.add_comm (n m : ℕ) : ..."}`` per line.

``theorems="generated"`` and ``lemmas="generated"`` make Lean-shaped data offline instead
(``generated_lean``: a pool of ``generated_lemmas`` lemmas about ℕ and theorems whose proofs
rewrite with some of them), large enough for every stage of the lean_gptneo_1.3b recipe.

``import_leandojo`` converts a LeanDojo benchmark (``random/train.json`` + ``corpus.jsonl``) to
these files: ``python -m rmt_peft.data.lean import-leandojo BENCHMARK.json corpus.jsonl OUT_DIR``.

Malformed lines and theorems too long for the requested segments are counted skips; a theorem
naming lemmas missing from the pool is skipped (``missing_lemmas="skip"``) or an error ("error").
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..fileio import atomic_path
from ..inputs import IGNORE_INDEX
from . import lean_import
from .noise import encode
from .skips import SkipCounter, json_lines
EXAMPLES = os.path.join(os.path.dirname(__file__), "examples")
EXAMPLE_THEOREMS = os.path.join(EXAMPLES, "lean_theorems.jsonl")
EXAMPLE_LEMMAS = os.path.join(EXAMPLES, "lean_lemmas.jsonl")
MISSING_LEMMAS = ("skip", "error")
GENERATED = "generated"
LOSS_ON = ("all", "proof")
logger = logging.getLogger("rmt_peft.data")


@dataclass(frozen=True)
class Theorem:
    name: str
    statement: str
    proof: str
    lemmas: tuple[str, ...]


def read_lemma_pool(path: str) -> dict[str, str]:
    """name -> statement from a lemma-pool JSONL file."""
    skips = SkipCounter(f"lemma pool {path}")
    pool: dict[str, str] = {}
    for number, record in json_lines(path, "lemma", skips):
        name, statement = record.get("name"), record.get("statement")
        if not isinstance(name, str) or not isinstance(statement, str) or not statement.strip():
            skips.skip("lemma without string 'name' and non-empty 'statement'", f"line {number}")
            continue
        pool[name] = statement
    if not pool:
        raise ValueError(f"{path}: no lemma found ({skips.summary()}); expected lines like "
                         '{"name": "Nat.add_comm", "statement": "theorem Nat.add_comm ..."}')
    if skips.total:
        logger.warning("%s; kept %d lemmas", skips.summary(), len(pool))
    return pool


def read_theorems(path: str, pool: dict[str, str], missing_lemmas: str = "skip") -> list[Theorem]:
    """Theorems of a JSONL file whose lemmas are all in ``pool`` (see ``missing_lemmas``)."""
    skips = SkipCounter(f"theorems {path}")
    theorems = []
    for number, record in json_lines(path, "theorem", skips):
        name, statement, proof, lemmas = (record.get(k) for k in ("name", "statement", "proof", "lemmas"))
        if not all(isinstance(v, str) and v.strip() for v in (statement, proof)) or not isinstance(lemmas, list) \
                or not all(isinstance(n, str) for n in lemmas):
            skips.skip("theorem without non-empty 'statement', 'proof' and a list of lemma names 'lemmas'",
                       f"line {number}")
            continue
        missing = [n for n in lemmas if n not in pool]
        if missing:
            if missing_lemmas == "error":
                raise ValueError(f"{path} line {number}: theorem {name!r} uses lemmas missing from the pool: "
                                 f"{missing} (set missing_lemmas='skip' to skip such theorems)")
            skips.skip("lemma names missing from the pool", f"line {number}: {missing[:3]}")
            continue
        theorems.append(Theorem(str(name or f"line {number}"), statement, proof, tuple(dict.fromkeys(lemmas))))
    if not theorems:
        raise ValueError(f"{path}: no usable theorem ({skips.summary()}); expected lines like "
                         '{"name": ..., "statement": ..., "proof": ..., "lemmas": [names in the pool]}')
    if skips.total:
        logger.warning("%s; kept %d theorems", skips.summary(), len(theorems))
    return theorems


VARIABLES = "abcdmnkxyz"
OPERATIONS = {"add": "+", "mul": "*", "sub": "-"}
NAME_PARTS = ["comm", "assoc", "zero", "one", "succ", "left", "right", "cancel", "distrib", "self"]


def _expression(rng: random.Random, names: str, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(names + "01") if rng.random() < 0.9 else f"Nat.succ {rng.choice(names)}"
    op = rng.choice(list(OPERATIONS.values()))
    left, right = _expression(rng, names, depth - 1), _expression(rng, names, depth - 1)
    return f"({left} {op} {right})" if depth > 1 and rng.random() < 0.5 else f"{left} {op} {right}"


def _statement(rng: random.Random, name: str) -> str:
    names = "".join(rng.sample(VARIABLES, rng.randint(1, 4)))
    binders = f"({' '.join(names)} : ℕ)"
    relation = rng.choice(["=", "=", "≤", "<"])
    return f"theorem {name} {binders} : {_expression(rng, names, 3)} {relation} {_expression(rng, names, 3)}"


def generated_lean(num_lemmas: int = 4000, seed: int = 0) -> tuple[dict[str, str], list[Theorem]]:
    """Lean-shaped data made up offline: ``num_lemmas`` lemmas (``theorem Nat.mul_comm_17 (a b : ℕ)
    : a * b = b * a``-like statements, not true ones) and ``num_lemmas // 4`` theorems whose proofs
    rewrite with 1-3 pool lemmas (``by / rw [Nat.add_zero_3, ...] / simp``). Deterministic in ``seed``."""
    rng = random.Random(f"lean-generated/{seed}")
    pool: dict[str, str] = {}
    for i in range(num_lemmas):
        op = rng.choice(list(OPERATIONS))
        name = f"Nat.{op}_{rng.choice(NAME_PARTS)}_{i}"
        pool[name] = _statement(rng, name)
    names = list(pool)
    theorems = []
    for i in range(max(1, num_lemmas // 4)):
        used = tuple(rng.sample(names, rng.randint(1, 3)))
        name = f"{rng.choice(list(OPERATIONS))}_{rng.choice(NAME_PARTS)}_thm_{i}"
        steps = [f"  rw [{', '.join(used)}]"] + rng.sample(["  simp", "  ring", "  omega", "  exact rfl"], 1)
        theorems.append(Theorem(name, _statement(rng, name), "by\n" + "\n".join(steps), used))
    return pool, theorems


@dataclass
class LeanOptions:
    """``theorems`` / ``lemmas``: the JSONL files (default: the shipped example), or both
    "generated" (``generated_lean`` with ``generated_lemmas`` lemmas, offline).
    ``missing_lemmas``: "skip" or "error" for theorems naming lemmas not in the pool.
    ``loss_on``: "all" tokens or the "proof" only."""

    theorems: str = EXAMPLE_THEOREMS
    lemmas: str = EXAMPLE_LEMMAS
    missing_lemmas: str = "skip"
    loss_on: str = "all"
    generated_lemmas: int = 4000

    def __post_init__(self):
        if self.missing_lemmas not in MISSING_LEMMAS:
            raise ValueError(f"missing_lemmas={self.missing_lemmas!r} is not allowed; allowed: {MISSING_LEMMAS}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r} is not allowed; allowed: {LOSS_ON}")
        if not isinstance(self.generated_lemmas, int) or self.generated_lemmas < 1:
            raise ValueError(f"generated_lemmas={self.generated_lemmas!r} must be an integer >= 1")
        if (self.theorems == GENERATED) != (self.lemmas == GENERATED):
            raise ValueError(f"theorems={self.theorems!r} and lemmas={self.lemmas!r}: use 'generated' for both "
                             "or files for both")
        for field_name in ("theorems", "lemmas"):
            if getattr(self, field_name) != GENERATED and not os.path.isfile(getattr(self, field_name)):
                raise FileNotFoundError(f"{field_name}={getattr(self, field_name)!r} is not a file")


@dataclass(frozen=True)
class LeanLayout:
    theorem: Theorem
    lemmas: tuple[str, ...]              # lemma names in sample order
    proof_span: tuple[int, int]


class LeanDataset(Dataset):
    """Deterministic samples (item ``i`` depends only on ``seed`` and ``i``)."""

    def __init__(self, options: LeanOptions, *, tokenizer, segment_size: int, num_segments: int,
                 num_samples: int, seed: int = 0):
        if tokenizer is None:
            raise ValueError("lean needs a tokenizer (for offline use: rmt_peft.data.tokenizer.offline_tokenizer())")
        self.options, self.tokenizer, self.seed, self.num_samples = options, tokenizer, seed, num_samples
        self.num_segments = num_segments
        self.max_length = num_segments * segment_size
        self.min_length = (num_segments - 1) * segment_size + 1
        if options.theorems == GENERATED:
            self.pool, theorems = generated_lean(options.generated_lemmas)
        else:
            self.pool = read_lemma_pool(options.lemmas)
            theorems = read_theorems(options.theorems, self.pool, options.missing_lemmas)
        self.names = sorted(self.pool)
        self._lemma_ids: dict[str, torch.Tensor] = {}
        self._theorem_ids: dict[Theorem, tuple[torch.Tensor, torch.Tensor]] = {}
        skips = SkipCounter(f"theorems {options.theorems} at {self.max_length} tokens")
        self.theorems = []
        for theorem in theorems:
            if self._base_length(theorem) > self.max_length:
                skips.skip(f"statement + used lemmas + proof longer than {self.max_length} tokens", theorem.name)
            else:
                self.theorems.append(theorem)
        if not self.theorems:
            raise ValueError(f"no theorem fits num_segments * segment_size = {self.max_length} tokens: {skips.summary()}")
        if skips.total:
            logger.warning("%s; kept %d theorems", skips.summary(), len(self.theorems))
        self.order = list(range(len(self.theorems)))
        random.Random(f"lean/{seed}/order").shuffle(self.order)
        for index in range(min(num_samples, 8)):  # a pool too small to fill the segments fails here
            self.layout(index)

    def lemma_ids(self, name: str) -> torch.Tensor:
        if name not in self._lemma_ids:
            self._lemma_ids[name] = torch.tensor(encode(self.tokenizer, "\n" + self.pool[name]), dtype=torch.long)
        return self._lemma_ids[name]

    def _text_ids(self, theorem: Theorem) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the statement and of the proof (with its blank line), cached per theorem."""
        if theorem not in self._theorem_ids:
            self._theorem_ids[theorem] = (torch.tensor(encode(self.tokenizer, theorem.statement), dtype=torch.long),
                                          torch.tensor(encode(self.tokenizer, "\n\n" + theorem.proof), dtype=torch.long))
        return self._theorem_ids[theorem]

    def _base_length(self, theorem: Theorem) -> int:
        statement, proof = self._text_ids(theorem)
        return len(statement) + len(proof) + sum(len(self.lemma_ids(n)) for n in theorem.lemmas)

    def layout(self, index: int) -> LeanLayout:
        """The theorem and lemma order of sample ``index`` and where its proof lands."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        theorem = self.theorems[self.order[index % len(self.order)]]
        rng = random.Random(f"lean/{self.seed}/{index}")
        total = self._base_length(theorem)
        chosen, tried, misses = list(theorem.lemmas), set(theorem.lemmas), 0
        # Greedy fill with random lemmas: stop when full, after 64 lemmas in a row that do not fit
        # (the room left is smaller than typical lemmas), or when the pool is used up.
        while total < self.max_length and misses < 64 and len(tried) < len(self.names):
            name = self.names[rng.randrange(len(self.names))]
            if name in tried:
                continue
            tried.add(name)
            size = len(self.lemma_ids(name))
            if total + size <= self.max_length:
                chosen.append(name)
                total += size
                misses = 0
            else:
                misses += 1
        if total < self.min_length:
            raise ValueError(f"lean sample {index} (theorem {theorem.name!r}): the lemma pool {self.options.lemmas} "
                             f"({len(self.names)} lemmas) fills only {total} tokens, {self.min_length - total} "
                             f"short of the {self.min_length} needed for {self.num_segments} segments of "
                             f"{self.max_length // self.num_segments}; use fewer segments, a larger pool or "
                             "lemmas=generated")
        rng.shuffle(chosen)
        return LeanLayout(theorem, tuple(chosen), (total - len(self._text_ids(theorem)[1]), total))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        layout = self.layout(index)
        statement, proof = self._text_ids(layout.theorem)
        input_ids = torch.cat([statement, *(self.lemma_ids(n) for n in layout.lemmas), proof])
        labels = input_ids.clone()
        if self.options.loss_on == "proof":
            labels[:layout.proof_span[0]] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def import_leandojo(benchmark_json: str, corpus_jsonl: str, out_dir: str) -> tuple[int, int]:
    """Convert a LeanDojo benchmark split (a JSON list of traced theorems) and its ``corpus.jsonl``
    (files with ``premises``) to ``out_dir/theorems.jsonl`` + ``out_dir/lemmas.jsonl``.

    Statement: ``theorem <full_name>`` and the initial goal (the first tactic's ``state_before``);
    proof: ``by`` and the tactics; lemmas: the premises named in ``annotated_tactic``. Malformed
    records are counted skips. Both files are written whole or not at all (temporary files renamed
    at the end); inputs that yield no theorem or no lemma are a UserError naming the file.
    Returns (theorems written, lemmas written)."""
    for path in (benchmark_json, corpus_jsonl):
        if not os.path.isfile(path):
            raise UserError(f"{path} is not a file")
    skips = SkipCounter(f"LeanDojo {benchmark_json}")
    lemma_lines = []
    for _, record in json_lines(corpus_jsonl, "corpus", skips):
        premises = record.get("premises")
        for premise in premises if isinstance(premises, list) else []:
            if isinstance(premise, dict) and isinstance(premise.get("full_name"), str) and premise["full_name"] \
                    and isinstance(premise.get("code"), str) and premise["code"]:
                lemma_lines.append(json.dumps({"name": premise["full_name"], "statement": premise["code"]},
                                              ensure_ascii=False))
            else:
                skips.skip("premise without full_name and code strings")
    if not lemma_lines:
        raise UserError(f"{corpus_jsonl}: no premise with full_name and code could be read (a LeanDojo "
                        f"corpus.jsonl has one JSON object with premises per line); {skips.summary()}")
    try:
        with open(benchmark_json, encoding="utf-8") as handle:
            benchmark = json.load(handle)
    except UnicodeDecodeError as error:
        raise UserError(f"{benchmark_json}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{benchmark_json}: not JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(benchmark, list):
        raise UserError(f"{benchmark_json}: expected a JSON list of theorems (LeanDojo benchmark format), got "
                        f"{type(benchmark).__name__}")
    theorem_lines = [line for line in (_theorem_line(record, skips) for record in benchmark) if line]
    if not theorem_lines:
        raise UserError(f"{benchmark_json}: no theorem with full_name and traced_tactics (tactic, state_before) "
                        f"could be read; {skips.summary()}")
    os.makedirs(out_dir, exist_ok=True)
    for name, lines in (("lemmas.jsonl", lemma_lines), ("theorems.jsonl", theorem_lines)):
        with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
    if skips.total:
        logger.warning("%s", skips.summary())
    return len(theorem_lines), len(lemma_lines)


def _theorem_line(record, skips: SkipCounter) -> str | None:
    """One theorems.jsonl line from a LeanDojo benchmark record, or None (a counted skip)."""
    name = record.get("full_name") if isinstance(record, dict) else None
    tactics = record.get("traced_tactics") if isinstance(record, dict) else None
    if not isinstance(name, str) or not name:
        skips.skip("theorem without a full_name string", str(record)[:80])
        return None
    if not isinstance(tactics, list) or not tactics:
        skips.skip("theorem without traced_tactics", name)
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("tactic"), str) for t in tactics) \
            or not isinstance(tactics[0].get("state_before"), str):
        skips.skip("traced tactic without tactic / state_before strings", name)
        return None
    used = []
    for tactic in tactics:
        annotated = tactic.get("annotated_tactic")
        premises = annotated[1] if isinstance(annotated, list) and len(annotated) > 1 else []
        used += [p["full_name"] for p in premises if isinstance(p, dict) and isinstance(p.get("full_name"), str)]
    return json.dumps({"name": name, "statement": f"theorem {name}\n{tactics[0]['state_before']}",
                       "proof": "by\n" + "\n".join("  " + t["tactic"] for t in tactics),
                       "lemmas": list(dict.fromkeys(used))}, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmt_peft.data.lean", description="Lean data tools: "
                                     "import public Lean data as theorems.jsonl + lemmas.jsonl")
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import-leandojo", help="LeanDojo benchmark -> theorems.jsonl + lemmas.jsonl")
    importer.add_argument("benchmark_json")
    importer.add_argument("corpus_jsonl")
    importer.add_argument("out_dir")
    minictx = commands.add_parser("import-minictx", help="miniCTX JSONL -> theorems.jsonl + lemmas.jsonl")
    minictx.add_argument("jsonl")
    minictx.add_argument("out_dir")
    records = commands.add_parser("import-records", help="JSON / JSONL theorem records (statement, proof, "
                                  "premises) -> theorems.jsonl + lemmas.jsonl")
    records.add_argument("path")
    records.add_argument("out_dir")
    records.add_argument("--preset", default="plain", choices=sorted(lean_import.PRESETS),
                         help="field names: plain (statement/proof/premises/name) or workbook "
                              "(formal_statement, proof or formal_proof)")
    for field_name in ("statement", "proof", "premises", "name"):
        records.add_argument(f"--{field_name}-field", help=f"the records' {field_name} field (overrides --preset)")
    for command in (importer, minictx, records):
        command.add_argument("--overwrite", action="store_true",
                             help="replace theorems.jsonl / lemmas.jsonl already in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        # like every command that writes (rmt_peft.runs.check_output): nothing is replaced unless asked
        existing = [n for n in ("theorems.jsonl", "lemmas.jsonl") if os.path.exists(os.path.join(args.out_dir, n))]
        if not args.out_dir.strip():
            raise UserError("OUT_DIR is empty; give the folder to write theorems.jsonl and lemmas.jsonl to")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UserError(f"{args.out_dir} is a file; expected a folder (OUT_DIR)")
        if existing and not args.overwrite:
            raise UserError(f"{args.out_dir} already holds {' and '.join(existing)}; nothing is overwritten: choose "
                            f"another OUT_DIR, or give --overwrite")
        if args.command == "import-leandojo":
            theorems, lemmas = import_leandojo(args.benchmark_json, args.corpus_jsonl, args.out_dir)
        elif args.command == "import-minictx":
            theorems, lemmas = lean_import.import_minictx(args.jsonl, args.out_dir)
        else:
            theorems, lemmas = lean_import.import_records(
                args.path, args.out_dir, args.preset, args.statement_field, args.proof_field, args.premises_field,
                args.name_field)
    except UserError as error:  # one line naming the file, exit code 2 (as every rmt-peft command)
        print(f"{args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {theorems} theorems and {lemmas} lemmas to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
