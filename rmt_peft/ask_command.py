"""``rmt-peft ask``: read a document of any length once, then answer questions from the memory.

    rmt-peft ask RUN_OR_ADAPTER --document FILE [--question TEXT ...] [--save-memory FILE]
    rmt-peft ask RUN_OR_ADAPTER --memory FILE [--question TEXT ...]

The document streams through the model one segment at a time (a progress bar on stderr; memory
stays constant in its length: the text is read and tokenized in pieces cut at whitespace, and the
reader holds one segment). Each answer is what ``generate(document + separator + question)``
would give (greedy), without reading the document again. ``--save-memory`` keeps the state after
the document (a small safetensors file) for later ``--memory`` calls; like every command that
writes (``rmt_peft.runs.check_output``), it refuses an existing file or a path inside a training
run unless ``--overwrite`` is given, and a run's own files always. With no ``--question``,
questions come from standard input, one per line. Answers go to standard output, one per line.
The run must have been trained on text (a run on raw token ids, like the quickstart's, has no
tokenizer and is refused).

For developers: the run (or adapter) is opened through ``rmt_peft.loading``, imported with torch
when the command runs, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys
from collections.abc import Iterable

from .errors import UserError
from .log import hide_library_progress_bars
from .options import add_model_options, description

READ_CHARS = 1 << 20  # characters of the document read (and tokenized) at a time


def register(subparsers) -> None:
    p = subparsers.add_parser("ask", help="read a long document once, answer questions from its memory",
                              description=description(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_ADAPTER", help="a training run, an adapter folder or a Hub id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--document", metavar="FILE", help="a text file of any length to read (see --encoding)")
    source.add_argument("--memory", metavar="FILE", help="a memory state saved by --save-memory (no re-reading)")
    p.add_argument("--question", action="append", default=[], metavar="TEXT",
                   help="a question (repeat for more); none: one question per line of standard input")
    p.add_argument("--save-memory", metavar="FILE", help="save the state after the document (.safetensors); "
                                                            "a new file, outside training runs, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save-memory file (never a training run's own files)")
    p.add_argument("--separator", default=" ", help="text between the document and each question (default: a space)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    p.add_argument("--encoding", default="utf-8", help="the document's text encoding (default utf-8; e.g. latin-1)")
    add_model_options(p)
    p.set_defaults(func=run)


def text_pieces(path: str, chars: int | None = None, encoding: str = "utf-8"):
    """The text of ``path`` in pieces of about ``chars`` characters, each cut before a whitespace run,
    so that tokenizing the pieces one by one gives the tokens of the whole text (words and the
    space that leads them stay together). Yields (piece, bytes read since the last piece)."""
    chars = chars or READ_CHARS
    carry, read = "", 0
    with open(path, encoding=encoding) as f:
        while True:
            block = f.read(chars)
            if not block:
                break
            if "\0" in block:
                raise UserError(f"--document {path} is binary (it holds NUL characters), not text")
            read += len(block.encode(encoding, errors="replace"))
            text = carry + block
            cut = len(text)
            while cut > 0 and not text[cut - 1].isspace():  # back over the last (maybe unfinished) word
                cut -= 1
            while cut > 0 and text[cut - 1].isspace():  # and the whitespace run before it
                cut -= 1
            if cut == 0:  # one word so far (no whitespace to cut at): keep reading
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut], read
            read = 0
    if carry or read:
        yield carry, read


def read_document(rmt, tokenizer, path: str, progress: bool, model: str, encoding: str = "utf-8"):
    """Stream ``path`` through ``rmt`` (loaded from ``model``); returns the MemoryState after it."""
    import torch
    from tqdm.auto import tqdm

    from .data.noise import encode
    from .memory_state import MemoryState

    stream = rmt.stream()
    device = rmt.memory.memory_tokens.device
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="reading", disable=not progress,
              file=sys.stderr) as bar:
        try:
            for piece, size in text_pieces(path, encoding=encoding):
                ids = encode(tokenizer, piece)
                if ids:
                    stream.feed(torch.tensor([ids], dtype=torch.long, device=device))
                bar.update(size)
                bar.set_postfix(tokens=stream.num_tokens, refresh=False)
        except UnicodeDecodeError as err:
            raise UserError(f"--document {path} is not {encoding} text ({err.reason}); give its --encoding, e.g. "
                            f"--encoding latin-1") from None
    if stream.num_tokens == 0:
        raise UserError(f"--document {path} holds no text to read; the answers would come from the initial memory")
    return MemoryState.from_stream(stream, document=os.path.basename(path), model=model)


def questions(args) -> Iterable[str]:
    """The --question texts, or the non-empty lines of standard input (read lazily)."""
    if args.question:
        return args.question
    return (line.rstrip("\n") for line in sys.stdin if line.strip())


def check_reads_text(args, recipe) -> None:
    """A run trained on raw token ids (token_memory: the quickstart) has no tokenizer: nothing can
    turn a document or a question into its ids."""
    from .data.registry import TASKS

    task = recipe.data.task if recipe is not None else None
    if task in TASKS and not TASKS[task].needs_tokenizer and not (args.tokenizer or recipe.model.tokenizer):
        raise UserError(f"{args.path} was trained on raw token ids (data.task {task!r}, no tokenizer), so it cannot "
                        f"read text; ask needs a run trained on a text task, such as those of the babilong_*, "
                        f"arxiv_gpt2 or lean_gptneo_1.3b recipes (rmt-peft recipes)")


def run(args: argparse.Namespace) -> int:
    # cheap checks first, before torch and the model load (seconds to minutes)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    for flag, path in (("--document", args.document), ("--memory", args.memory)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path} is not a file")
    import torch

    from . import loading, runs
    from .backbones import position_limit
    from .data.noise import encode
    from .memory_state import MemoryState

    if args.no_progress:
        hide_library_progress_bars()  # transformers' "Loading weights" too

    if args.document is not None:
        try:
            codecs.lookup(args.encoding)
        except LookupError:
            raise UserError(f"--encoding {args.encoding!r} is not a text encoding Python knows (e.g. utf-8, "
                            f"latin-1)") from None
        wide = any(n in codecs.lookup(args.encoding).name for n in ("16", "32"))  # UTF-16 / 32 text holds NULs
        with open(args.document, "rb") as f:
            if not wide and b"\0" in f.read(1 << 13):
                raise UserError(f"--document {args.document} is binary (it holds NUL bytes), not text")
    if args.save_memory is not None:  # before the model loads: a refusal costs nothing
        runs.check_output(args.save_memory, "--save-memory", args.overwrite, folder=False)
    try:
        adapter, recipe_path = loading.locate(args.path)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    recipe = loading.read_recipe(recipe_path)
    check_reads_text(args, recipe)
    # The stream cuts segments from the first token: the state after a document is then the same
    # whatever question follows (right alignment would cut the document by the question's length).
    rmt = loading.load_model(adapter, recipe, args, {"segment_alignment": "left"})
    name = loading.tokenizer_name(recipe, adapter, args.tokenizer)
    tokenizer = loading.command_tokenizer(recipe, adapter, args.tokenizer)
    vocabulary = rmt.causal_lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocabulary:
        raise UserError(f"the tokenizer {name!r} has {len(tokenizer)} tokens but {args.path} reads ids below "
                        f"{vocabulary}: they do not belong together; pass the run's own tokenizer (--tokenizer)")
    # the answer's positions: the read memory, at least one token to answer, the new tokens
    limit = position_limit(rmt.causal_lm.config)
    most = None if limit is None else limit - rmt.memory_config.num_memory_tokens - 1
    if most is not None and args.max_new_tokens > most:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: the model has {limit} positions, of which "
                        f"{rmt.memory_config.num_memory_tokens} hold the memory; allowed: at most {most} "
                        f"(less the question's and the pending tokens)")
    if args.memory:
        state = MemoryState.load_for(args.memory, rmt)
        read_by = state.info.get("model")
        if read_by and os.path.abspath(read_by) != os.path.abspath(args.path):
            # Same memory config, maybe another model: a memory is only meaningful to the model that wrote it.
            print(f"note: {args.memory} was read by {read_by}, not {args.path}", file=sys.stderr)
    else:
        state = read_document(rmt, tokenizer, args.document, not args.no_progress, args.path, args.encoding)
    if args.save_memory is not None:
        state.save(args.save_memory)
        print(f"saved the memory of {state.num_tokens} tokens to {args.save_memory}", file=sys.stderr)

    device = rmt.memory.memory_tokens.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for question in questions(args):
        ids = torch.tensor([encode(tokenizer, args.separator + question)], dtype=torch.long, device=device)
        try:
            new = state.generate(rmt, ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        except ValueError as err:  # a question (+ the pending tokens + the answer) beyond the position table
            raise UserError(f"--question {question[:40]!r}: {err}") from None
        answer = tokenizer.decode(new[0], skip_special_tokens=True)
        print(" ".join(answer.split()), flush=True)
    return 0
