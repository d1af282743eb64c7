"""Text sources: background noise for the memory tasks and documents for language modelling.

Three kinds of source, all exposing the same two views:

* ``iter_documents()``: the documents in order, lazily (arxiv_lm reads only as many as it needs);
* ``noise_chunks(rng)``: an endless stream of token-id chunks starting at a random document and
  offset (the memory tasks cut exactly as many noise tokens as a sample needs from it).

Sources: ``"generated"`` (an offline random-sentence generator whose vocabulary is disjoint from the
bAbI-style facts, so noise never looks like a fact), ``"files"`` (local text files, one document per
file) and ``"dataset"`` (any ``datasets`` text dataset from the Hub or local files, streaming by
default; presets ``"pg19"`` and ``"quality"`` are the backgrounds BABILong uses, ``"arxiv"`` the
Pile's ArXiv subset of the paper's language-modelling experiment).

Bad records are counted skips (see skips.py): empty documents, non-UTF-8 files, non-string fields.
Documents are tokenized in pieces of at most ``PIECE_CHARS`` characters, so no step holds more than
one document (and its tokens in pieces) in memory, however long the sample. A document longer than
``LONG_DOCUMENT_CHARS`` (a 100 MB single-line file, say) is never tokenized whole: each sample
starts at a random character and tokenizes only the pieces it takes.
"""
from __future__ import annotations

import codecs
import glob
import os
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .skips import SkipCounter

PIECE_CHARS = 16_384
LONG_DOCUMENT_CHARS = 1 << 20  # about 250k tokens: beyond this, tokenize the pieces a sample takes
PROBE_BYTES = 8192  # validation reads this much of a noise file to tell text from binary
SOURCES = ("generated", "files", "dataset")
# Hub datasets by short name: (path, config name, text field). Overridable with a dict spec.
PRESETS = {
    "pg19": ("emozilla/pg19", None, "text"),
    "quality": ("tasksource/QuALITY", None, "article"),
    "arxiv": ("ArmelR/the-pile-splitted", "ArXiv", "text"),
}

# The generator's words. None of them is a person, place, object or direction of babilong.py.
NOISE_WORDS = {
    "determiners": ["the", "a", "every", "some", "that", "this", "one", "no"],
    "adjectives": ["old", "quiet", "bright", "small", "heavy", "distant", "gentle", "cold", "warm", "dark",
                   "narrow", "broad", "silver", "green", "ancient", "early", "late", "strange", "simple",
                   "patient", "hollow", "steady", "pale", "sharp", "soft", "wild", "calm", "bitter", "golden",
                   "slow"],
    "nouns": ["river", "wind", "stone", "lamp", "letter", "song", "horse", "bridge", "window", "cloud", "tree",
              "road", "candle", "boat", "forest", "village", "clock", "mountain", "sailor", "captain",
              "farmer", "merchant", "teacher", "child", "story", "storm", "harbor", "field", "tower",
              "voice", "shadow", "morning", "evening", "winter", "summer", "market", "ship", "king",
              "queen", "bird"],
    "verbs": ["watched", "followed", "crossed", "remembered", "carried", "found", "passed", "touched",
              "answered", "painted", "admired", "forgot", "guarded", "described", "opened", "closed",
              "reached", "ignored", "praised", "studied", "heard", "visited", "built", "sold", "loved",
              "feared", "greeted", "mended", "counted", "named"],
    "adverbs": ["slowly", "quietly", "again", "often", "suddenly", "carefully", "once", "gladly", "rarely",
                "softly"],
    "prepositions": ["near", "beyond", "under", "along", "behind", "beside", "across", "above", "around",
                     "past"],
}


@dataclass
class TextSourceOptions:
    """Where text comes from. ``source``: one of SOURCES. ``files``: a path, glob or list of them
    (files source). ``path``/``name``/``split``/``text_field``/``data_files``/``streaming``: the
    arguments of ``datasets.load_dataset`` and the column holding the text (dataset source).
    ``pool_size``: how many documents of a streaming dataset (or of the generator) serve as noise.
    ``seed``: the generated source's seed. ``document_words``: mean words per generated document.
    ``load_kwargs``: more ``load_dataset`` arguments (e.g. ``{encoding_errors: replace}`` for the
    "text" builder on files that are not UTF-8, or ``{revision: ...}``)."""

    source: str = "generated"
    files: str | list[str] | None = None
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: str | list[str] | dict | None = None
    streaming: bool = True
    pool_size: int = 128
    seed: int = 0
    document_words: int = 1500
    load_kwargs: dict | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} is not known; allowed: {SOURCES} (or a preset {tuple(PRESETS)})")
        if self.source == "files" and not self.files:
            raise ValueError("source='files' needs files= (a path, a glob or a list of them)")
        if self.source == "files":
            check_text_files(self.files)
        if self.source == "dataset" and not (self.path or self.data_files):
            raise ValueError("source='dataset' needs path= (a Hub dataset or a builder such as 'text') "
                             "and/or data_files=")
        if self.load_kwargs is not None and not isinstance(self.load_kwargs, dict):
            raise ValueError(f"load_kwargs={self.load_kwargs!r} must be a dict of load_dataset arguments")
        for name, low in (("pool_size", 1), ("seed", 0), ("document_words", 10)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"streaming={self.streaming!r} must be true or false")

    @classmethod
    def parse(cls, spec: "str | dict | TextSourceOptions", what: str) -> "TextSourceOptions":
        """From a recipe value: a source name, a preset name, or a dict of the fields above (whose
        ``source`` may also be a preset name, the other fields overriding the preset's)."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            if spec in PRESETS:
                path, name, text_field = PRESETS[spec]
                return cls(source="dataset", path=path, name=name, text_field=text_field)
            if spec == "generated":
                return cls()
            raise ValueError(f"{what}={spec!r} is not known; allowed: 'generated', a preset {tuple(PRESETS)}, "
                             f"or a dict with source in {SOURCES}")
        if isinstance(spec, dict):
            allowed = tuple(f.name for f in cls.__dataclass_fields__.values())
            unknown = sorted(set(spec) - set(allowed))
            if unknown:
                raise ValueError(f"{what}: unknown option(s) {unknown}; allowed: {allowed}")
            if spec.get("source") in PRESETS:  # a preset with overrides, e.g. {source: pg19, split: test}
                path, name, text_field = PRESETS[spec["source"]]
                spec = {"path": path, "name": name, "text_field": text_field, **spec, "source": "dataset"}
            return cls(**spec)
        raise ValueError(f"{what} must be a string or a dict, got {type(spec).__name__}")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and without the too-long-sequence warning:
    documents are longer than any model's context by design)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


def pieces(text: str, start: int = 0, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text[start:]`` in pieces of about ``size`` characters, cut just before whitespace so each
    piece after the first starts with the space that a BPE tokenizer folds into the next word."""
    while start < len(text):
        end = start + size
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space if space > start else end
        yield text[start:end]
        start = end


class GeneratedText:
    """Endless documents of random sentences; document ``i`` depends only on (seed, i).

    Each document repeats a few topic nouns, so earlier segments help predict later ones (the
    language-modelling-with-history task then rewards memory a little, as real documents do)."""

    def __init__(self, seed: int = 0, document_words: int = 1500, pool_size: int = 128):
        self.seed, self.document_words, self.pool_size = seed, document_words, pool_size
        self.skips = SkipCounter("generated text")  # never skips; keeps the sources interchangeable
        self.name = f"generated text (seed {seed})"

    def __len__(self) -> int:
        """Documents available as noise (``iter_documents`` itself never ends)."""
        return self.pool_size

    def __getitem__(self, index: int) -> str:
        rng = random.Random(f"generated/{self.seed}/{index}")
        w = NOISE_WORDS
        topics = rng.sample(w["nouns"], 5)
        num_sentences = max(1, rng.randint(self.document_words // 2, self.document_words * 3 // 2) // 10)
        nouns = [rng.choice(topics) if rng.random() < 0.3 else rng.choice(w["nouns"]) for _ in range(2 * num_sentences)]
        det, adj = rng.choices(w["determiners"], k=2 * num_sentences), rng.choices(w["adjectives"], k=2 * num_sentences)
        verbs, adverbs = rng.choices(w["verbs"], k=num_sentences), rng.choices(w["adverbs"], k=num_sentences)
        preps = rng.choices(w["prepositions"], k=num_sentences)
        sentences = [f"{det[2 * i].capitalize()} {adj[2 * i]} {nouns[2 * i]} {verbs[i]} {det[2 * i + 1]} "
                     f"{adj[2 * i + 1]} {nouns[2 * i + 1]} {adverbs[i]} {preps[i]} the {rng.choice(topics)}."
                     for i in range(num_sentences)]
        return " ".join(sentences)

    def iter_documents(self) -> Iterator[str]:
        index = 0
        while True:
            yield self[index]
            index += 1


def matching_files(files: str | list[str]) -> list[str]:
    """The files ``files`` (paths or globs) name; FileNotFoundError naming a pattern that matches none."""
    patterns = [files] if isinstance(files, str) else list(files)
    paths: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"files: {pattern!r} is not a path or glob")
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise FileNotFoundError(f"files: no file matches {pattern!r}")
        paths.extend(p for p in matched if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"files: {patterns} match only directories")
    return paths


def text_problem(path: str) -> str | None:
    """Why ``path`` cannot be a noise document (empty, binary, not UTF-8), read from its start only."""
    with open(path, "rb") as handle:
        head = handle.read(PROBE_BYTES)
    if not head.strip():
        return "empty"
    if b"\0" in head:
        return "binary (NUL bytes)"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as error:
        return f"not UTF-8 text (byte {error.start})"
    return None


def check_text_files(files: str | list[str]) -> None:
    """ValueError when ``files`` match nothing or no matching file starts with text (the first usable
    file ends the check; later bad files are counted skips while reading)."""
    try:
        paths = matching_files(files)
    except OSError as error:
        raise ValueError(str(error)) from None
    problems = []
    for path in paths:
        try:
            problem = text_problem(path)
        except OSError as error:
            problem = f"unreadable ({error.strerror})"
        if problem is None:
            return
        problems.append(f"{path}: {problem}")
    raise ValueError(f"files: no usable text file among {len(paths)} ({'; '.join(problems[:3])}"
                     f"{'; ...' if len(problems) > 3 else ''})")


class FileText:
    """Local text files, one document per file, read when needed and decoded as strict UTF-8
    (a file with invalid bytes is a counted skip naming the file and the byte offset)."""

    def __init__(self, files: str | list[str]):
        patterns = [files] if isinstance(files, str) else list(files)
        self.paths = matching_files(files)
        self._undecodable: set[int] = set()  # counted once, however often the noise cycles past them
        self.skips = SkipCounter(f"text files {patterns}")
        self.name = f"text files {patterns}"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        if index in self._undecodable:
            return None
        path = self.paths[index]
        with open(path, "rb") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            self._undecodable.add(index)
            self.skips.skip("not valid UTF-8", f"{path}: byte {error.start}")
            return None
        if "\0" in text:
            self._undecodable.add(index)
            self.skips.skip("binary (NUL bytes)", path)
            return None
        return text

    def iter_documents(self) -> Iterator[str]:
        for index in range(len(self)):
            text = self[index]
            if text is not None:
                yield text


class DatasetText:
    """A ``datasets`` text dataset. Map-style datasets are read by index (memory-mapped Arrow);
    streaming ones are read in order, and the first ``pool_size`` documents are kept for the random
    noise offsets (a stream has no random access)."""

    def __init__(self, options: TextSourceOptions):
        import datasets  # heavy import: only when a dataset source is used

        kwargs = {"split": options.split, "streaming": options.streaming, **(options.load_kwargs or {})}
        if options.data_files is not None:
            kwargs["data_files"] = options.data_files
        path = options.path or "text"
        self.name = f"dataset {path}" + (f"/{options.name}" if options.name else "") + f"[{options.split}]"
        try:
            self.dataset = datasets.load_dataset(path, options.name, **kwargs)
        except ConnectionError as error:  # offline, or the Hub unreachable: say which dataset and what to do
            raise ConnectionError(f"{self.name} is not in the local cache and the Hub cannot be reached ({error}): "
                                  f"run once online to cache it, or use a local source (noise: generated, or "
                                  f"{{source: files, ...}})") from error
        except datasets.exceptions.DatasetGenerationError as error:
            raise ValueError(f"{self.name} could not be prepared ({error.__cause__!r}); for text files that are "
                             "not UTF-8 pass load_kwargs: {encoding_errors: replace}") from error
        self.text_field, self.pool_size, self.streaming = options.text_field, options.pool_size, options.streaming
        self.skips = SkipCounter(self.name)
        self._pool: list[str] | None = None
        columns = getattr(self.dataset, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise ValueError(f"text_field={self.text_field!r} is not a column of {self.name}; columns: {columns}")

    def _text(self, record: dict) -> str | None:
        text = record.get(self.text_field)
        if not isinstance(text, str):
            self.skips.skip(f"field {self.text_field!r} missing or not a string", repr(type(text).__name__))
            return None
        return text

    def iter_documents(self) -> Iterator[str]:
        try:
            for record in self.dataset:
                text = self._text(record)
                if text is not None:
                    yield text
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.name}: the data is not valid UTF-8 ({error}); for text files pass "
                             "load_kwargs: {encoding_errors: replace}") from error

    def _documents(self):
        if not self.streaming:
            return self.dataset
        if self._pool is None:
            self._pool = []
            for text in self.iter_documents():
                self._pool.append(text)
                if len(self._pool) >= self.pool_size:
                    break
        return self._pool

    def __len__(self) -> int:
        return len(self._documents())

    def __getitem__(self, index: int) -> str | None:
        documents = self._documents()
        return documents[index] if self.streaming else self._text(documents[index])


def text_source(options: TextSourceOptions):
    """The source object for ``options``."""
    if options.source == "generated":
        return GeneratedText(options.seed, options.document_words, options.pool_size)
    if options.source == "files":
        return FileText(options.files)
    return DatasetText(options)


class NoiseStream:
    """Token-id chunks of background text for ``tokenizer``, starting anywhere in ``source``.

    Tokenized documents are kept in a least-recently-used cache of at most ``cache_tokens`` tokens,
    so samples after the first cost slicing rather than tokenizing, and memory stays bounded."""

    def __init__(self, source, tokenizer, cache_tokens: int = 1 << 22):
        self.source, self.tokenizer, self.cache_tokens = source, tokenizer, cache_tokens
        self.empty = SkipCounter(f"noise from {source.name}")
        self._cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._cached = 0
        self._long: dict[int, str] = {}  # the text of the last long document (see LONG_DOCUMENT_CHARS)
        if len(source) == 0:
            raise ValueError(f"noise source {source.name} has no documents")

    def text(self, index: int) -> str | None:
        if index in self._long:
            return self._long[index]
        text = self.source[index]
        if text is not None and len(text) > LONG_DOCUMENT_CHARS:
            self._long = {index: text}
        return text

    def long_document_pieces(self, index: int, rng: random.Random | None) -> Iterator[torch.Tensor] | None:
        """Token pieces of a long document from a random character (from its start without ``rng``),
        tokenized as they are taken; None for a document short enough to tokenize whole."""
        if index in self._cache:
            return None
        text = self.text(index)
        if text is None or len(text) <= LONG_DOCUMENT_CHARS:
            return None
        start = 0
        if rng is not None:
            start = text.find(" ", rng.randrange(len(text)))  # cut at a word boundary
            start = 0 if start < 0 else start
        return (torch.tensor(ids, dtype=torch.long) for ids in (encode(self.tokenizer, p) for p in pieces(text, start))
                if ids)

    def document_tokens(self, index: int) -> list[torch.Tensor]:
        """Document ``index`` as token pieces ([] for an empty or undecodable document)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        text = self.text(index)
        tokens = [] if text is None else [torch.tensor(ids, dtype=torch.long)
                                          for ids in (encode(self.tokenizer, p) for p in pieces(text)) if ids]
        if text is not None and not tokens:
            self.empty.skip("empty document (no tokens)", f"document {index}")
        size = sum(len(t) for t in tokens)
        if size <= self.cache_tokens:
            self._cache[index] = tokens
            self._cached += size
            while self._cached > self.cache_tokens:
                _, evicted = self._cache.popitem(last=False)
                self._cached -= sum(len(t) for t in evicted)
        return tokens

    def chunks(self, rng: random.Random) -> Iterator[torch.Tensor]:
        """Endless LongTensor chunks: from a random token of a random document, then the following
        documents cyclically. Raises if many documents in a row (or a whole cycle) have no token."""
        count = len(self.source)
        index = rng.randrange(count)
        tokens = self.long_document_pieces(index, rng)
        if tokens is None:
            tokens = self.document_tokens(index)
        skip = rng.randrange(sum(len(t) for t in tokens)) if isinstance(tokens, list) and tokens else 0
        barren = 0  # consecutive documents without a token
        while True:
            produced = False
            for piece in tokens:
                produced = True
                if skip >= len(piece):
                    skip -= len(piece)
                    continue
                yield piece[skip:]
                skip = 0
            barren = 0 if produced else barren + 1
            if barren >= min(count, 10_000):
                raise ValueError(f"noise source {self.source.name}: {barren} documents in a row without any "
                                 f"token; {self.empty.summary()}; {self.source.skips.summary()}")
            index = (index + 1) % count
            tokens = self.long_document_pieces(index, None)
            if tokens is None:
                tokens = self.document_tokens(index)


def take(chunks: Iterator[torch.Tensor], count: int, carry: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Exactly ``count`` tokens from ``chunks`` (in pieces); leftovers stay in ``carry`` for the next call."""
    while count > 0:
        chunk = carry.pop() if carry else next(chunks)
        if len(chunk) > count:
            carry.append(chunk[count:])
            chunk = chunk[:count]
        count -= len(chunk)
        yield chunk
