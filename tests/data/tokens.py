"""Helpers shared by the data tests."""


def find(haystack, needle) -> list[int]:
    """Start positions of the token sequence ``needle`` in ``haystack`` (1-D tensors or lists)."""
    hay, pin = list(map(int, haystack)), list(map(int, needle))
    first = pin[0]
    return [i for i, token in enumerate(hay[:len(hay) - len(pin) + 1]) if token == first and hay[i:i + len(pin)] == pin]


def ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as running text (leading space, no special tokens), computed directly."""
    return tokenizer(" " + text, add_special_tokens=False)["input_ids"]
