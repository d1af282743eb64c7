"""An offline tokenizer for tests and recipes on tiny models (nothing is downloaded).

A ``tokenizers`` WordPiece model whose vocabulary is every word of our generators (babilong.py
facts and questions, noise.py background text) and a few Lean keywords as whole tokens, plus single
characters (``a``, ``##a``, digits, punctuation, common Lean symbols) as a fallback, so any other
word still encodes (character by character) instead of becoming ``<unk>``. Wrapped in ``PreTrainedTokenizerFast`` so
it saves and loads like any Hub tokenizer: ``save_offline_tokenizer(path)`` next to a tiny model
(``rmt_peft.tiny_models.save_tiny_model``) gives a local checkpoint that ``AutoTokenizer`` loads.
The model's ``vocab_size`` must be at least ``len(tokenizer)``.
"""
from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import babilong, noise

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2: tiny models use bos 0 / eos 1
LEAN_SYMBOLS = "ℕℤℚℝ⊢→←↔∀∃¬∧∨≤≥≠∈∉⊆⊂∪∩λ⟨⟩·∘αβγ∑∏√∞∣₁₂"
LEAN_WORDS = ["theorem", "lemma", "def", "by", "rw", "exact", "intro", "simp", "apply", "have", "show", "fun",
              "Nat", "List", "Prop", "max", "min", "length", "reverse", "map", "succ", "add", "mul", "sub", "zero",
              "one", "two", "comm", "assoc"]


def offline_vocabulary() -> list[str]:
    """The vocabulary in id order (deterministic: the same ids on every machine)."""
    words = set(babilong.PEOPLE + babilong.PLACES + babilong.OBJECTS + babilong.QUESTION_WORDS + list(babilong.OPPOSITE)
                + LEAN_WORDS)
    for phrase in babilong.MOVES + babilong.TAKES:
        words.update(phrase.split())
    for group in noise.NOISE_WORDS.values():
        words.update(group)
        words.update(w.capitalize() for w in group)
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation + LEAN_SYMBOLS))
    whole = sorted(words - set(characters))
    return SPECIAL_TOKENS + characters + ["##" + c for c in characters] + whole


def offline_tokenizer() -> PreTrainedTokenizerFast:
    """The offline tokenizer (about 500 tokens)."""
    vocab = {token: index for index, token in enumerate(offline_vocabulary())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                         max_input_chars_per_word=200))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and punctuation apart
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=10 ** 9)


def save_offline_tokenizer(path: str) -> str:
    """Save the offline tokenizer to ``path`` (e.g. a tiny model's folder) for ``AutoTokenizer``."""
    offline_tokenizer().save_pretrained(path)
    return path
