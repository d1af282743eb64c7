"""Options the commands share (rmt_peft/options.py): --help text from a module docstring, and the
flags that say how a run or adapter is loaded."""
import argparse

import pytest

from rmt_peft.options import add_model_options, description


def test_help_text_is_the_docstring_before_the_developer_notes_without_rest_markup():
    doc = """``rmt-peft ask``: questions to a ``RUN``.

    Reads the ``document`` once.

    For developers: ``loading.py`` opens the run.
    """
    assert description(doc) == "rmt-peft ask: questions to a RUN.\n\n    Reads the document once."
    assert description("No notes, `single` ticks stay.") == "No notes, `single` ticks stay."


def test_model_options_default_to_none_and_quantization_is_checked():
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args([])
    assert (args.quantization, args.dtype, args.device, args.base_model, args.tokenizer, args.no_progress) == (
        None, None, None, None, None, False)
    args = parser.parse_args(["--quantization", "4bit", "--dtype", "float32", "--device", "cpu", "--base-model", "b",
                              "--tokenizer", "offline", "--no-progress"])
    assert (args.quantization, args.dtype, args.device, args.base_model, args.tokenizer, args.no_progress) == (
        "4bit", "float32", "cpu", "b", "offline", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "3bit"])
