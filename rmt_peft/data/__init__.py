"""Data builders: each turns a task into tokenized samples of a requested number of segments.

registry.py (task name + options -> dataset, the entry point), collate.py (padding), babilong.py
(memory tasks), arxiv_lm.py (language modelling with history), lean.py (theorem proving),
noise.py (text sources: generated, files, ``datasets``), token_memory.py (the raw-token quickstart
task), associative_retrieval.py (K key-value pairs, one key asked: the capacity task), tokenizer.py
(an offline tokenizer for tiny models), skips.py (counted skips of bad input).
See docs/data.md.
"""
