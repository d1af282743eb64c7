"""Importers of public Lean data into the ``lean`` task's files (theorems.jsonl + lemmas.jsonl).

Besides LeanDojo (``lean.import_leandojo``: LeanDojo Benchmark 4 and traces in its format, such
as Lean-GitHub):

* ``import_minictx``: miniCTX (l3lab/miniCTX; one JSON object per line with ``theoremName``,
  ``theoremStatement``, ``srcContext``: the file before the theorem, and ``proofMetadata.proof``).
  The pool is every declaration of every ``srcContext`` (``theorem`` / ``lemma`` / ``def`` / ...,
  named ``FILE:NAME``); a theorem's lemmas are the declarations of its own file that its proof names.
* ``import_records``: any JSON / JSONL list of theorem records with a statement, a proof and
  optionally premises, field names given (presets: ``workbook`` for Lean Workbook and
  DeepSeek-Prover style ``formal_statement`` + ``proof`` / ``formal_proof``, ``plain``). Premises
  are names or ``{name, statement|code}`` objects; objects join the pool. Every theorem's own
  statement joins the pool too, so datasets without premises still give distractors.

Each writes ``OUT_DIR/theorems.jsonl`` and ``OUT_DIR/lemmas.jsonl`` and returns (theorems, lemmas)
written; malformed records are counted skips (``SkipCounter``), never silent.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator

from .skips import SkipCounter, json_lines

logger = logging.getLogger("rmt_peft.data")
DECLARATION = re.compile(r"^(?:@\[[^\]]*\]\s*)?(?:(?:private|protected|noncomputable)\s+)*"
                         r"(theorem|lemma|def|abbrev|instance|structure|class|inductive)\s+([^\s:({\[]+)", re.M)
PRESETS = {  # preset -> (statement field, proof field(s), premises field, name field)
    "workbook": ("formal_statement", ("proof", "formal_proof"), None, "name"),
    "plain": ("statement", ("proof",), "premises", "name"),
}


def _write(out_dir: str, theorems: list[dict], pool: dict[str, str]) -> tuple[int, int]:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lemmas.jsonl"), "w", encoding="utf-8") as out:
        for name, statement in pool.items():
            out.write(json.dumps({"name": name, "statement": statement}, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "theorems.jsonl"), "w", encoding="utf-8") as out:
        for theorem in theorems:
            out.write(json.dumps(theorem, ensure_ascii=False) + "\n")
    return len(theorems), len(pool)


def declarations(source: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each top-level declaration in Lean ``source``, its text up to the next one."""
    found = list(DECLARATION.finditer(source))
    for match, after in zip(found, found[1:] + [None]):
        end = after.start() if after is not None else len(source)
        yield match.group(2), source[match.start():end].strip()


def import_minictx(path: str, out_dir: str) -> tuple[int, int]:
    """miniCTX JSONL -> theorems.jsonl + lemmas.jsonl (see the module docstring)."""
    skips = SkipCounter(f"miniCTX {path}")
    theorems, pool = [], {}
    for number, record in json_lines(path, "miniCTX", skips):
        proof = (record.get("proofMetadata") or {}).get("proof")
        name, statement, context = record.get("theoremName"), record.get("theoremStatement"), record.get("srcContext")
        if not all(isinstance(v, str) and v.strip() for v in (name, statement, proof)):
            skips.skip("entry without theoremName, theoremStatement and proofMetadata.proof", f"line {number}")
            continue
        file = record.get("file") or f"line{number}"
        local = {}
        for decl, text in declarations(context if isinstance(context, str) else ""):
            local[decl] = f"{file}:{decl}"
            pool[local[decl]] = text
        used = [local[d] for d in local if re.search(rf"(?<![\w.']){re.escape(d)}(?![\w'])", proof)]
        theorems.append({"name": name, "statement": statement, "proof": proof, "lemmas": used})
    if skips.total:
        logger.warning("%s", skips.summary())
    return _write(out_dir, theorems, pool)


def _records(path: str, skips: SkipCounter) -> Iterator[tuple[int, dict]]:
    """Records of a JSON list or a JSONL file."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1 << 16).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as handle:
            for number, record in enumerate(json.load(handle), 1):
                if isinstance(record, dict):
                    yield number, record
                else:
                    skips.skip("record is not a JSON object", f"item {number}")
    else:
        yield from json_lines(path, "record", skips)


def import_records(path: str, out_dir: str, preset: str = "plain", statement_field: str | None = None,
                   proof_field: str | None = None, premises_field: str | None = None,
                   name_field: str | None = None) -> tuple[int, int]:
    """Theorem records (JSON list or JSONL) -> theorems.jsonl + lemmas.jsonl; fields from ``preset``
    unless given. Premises: a list of names (in the pool from other records' objects or statements)
    or of objects ``{"name", "statement" or "code"}``."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not known; allowed: {sorted(PRESETS)}")
    statement_key, proof_keys, premises_key, name_key = PRESETS[preset]
    statement_key, name_key = statement_field or statement_key, name_field or name_key
    proof_keys = (proof_field,) if proof_field else proof_keys
    premises_key = premises_field or premises_key
    skips = SkipCounter(f"records {path}")
    theorems, pool = [], {}
    for number, record in _records(path, skips):
        statement = record.get(statement_key)
        proof = next((record[k] for k in proof_keys if isinstance(record.get(k), str) and record[k].strip()), None)
        if not isinstance(statement, str) or not statement.strip() or proof is None:
            skips.skip(f"record without '{statement_key}' and one of {list(proof_keys)}", f"item {number}")
            continue
        name = str(record.get(name_key) or f"theorem_{number}")
        used = []
        for premise in (record.get(premises_key) or []) if premises_key else []:
            if isinstance(premise, dict):
                text = premise.get("statement") or premise.get("code")
                premise_name = premise.get("name") or premise.get("full_name")
                if isinstance(premise_name, str) and isinstance(text, str):
                    pool[premise_name] = text
                    used.append(premise_name)
                    continue
            elif isinstance(premise, str):
                used.append(premise)
                continue
            skips.skip("premise that is neither a name nor {name, statement}", f"item {number}")
        pool.setdefault(name, statement)
        theorems.append({"name": name, "statement": statement, "proof": proof, "lemmas": list(dict.fromkeys(used))})
    # A theorem's own statement is no premise of itself; names still missing from the pool are
    # left for the lean task's missing_lemmas option to skip or report.
    if skips.total:
        logger.warning("%s", skips.summary())
    return _write(out_dir, theorems, pool)
