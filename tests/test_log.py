"""One verbosity for the commands: rank 0 speaks, known third-party noise is dropped unless -v."""
import logging
import warnings

import pytest

from rmt_peft import log


@pytest.fixture(autouse=True)
def restore_process_settings(monkeypatch):
    """setup() configures the whole process (it is meant to run once per command): undo it after."""
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    yield
    log.setup(0)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def seen(logger_name, message, level=logging.WARNING):
    """Whether ``message`` logged on ``logger_name`` passes the logger's filters."""
    target = logging.getLogger(logger_name)
    records = Records()
    target.addHandler(records)
    try:
        target.log(level, message)
    finally:
        target.removeHandler(records)
    return message in records.messages


def test_known_noise_is_dropped_unless_verbose(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    gemm = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    accelerator = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    log.setup(0)
    assert not seen("bitsandbytes.backends.cpu.ops", gemm) and not seen("DeepSpeed", accelerator)
    assert not seen("torchao", "Failed to load /site/torchao/_C_mxfp8.so: Could not load this library")
    assert seen("DeepSpeed", "ZeRO stage 3 needs more memory")  # other warnings still reach the user
    assert seen("torchao", "a torchao warning that is not about its optional kernels")
    assert log.logger.isEnabledFor(logging.INFO) and not log.logger.isEnabledFor(logging.DEBUG)
    log.setup(1)
    assert seen("bitsandbytes.backends.cpu.ops", gemm) and seen("DeepSpeed", accelerator)
    log.setup(-1)
    assert not log.logger.isEnabledFor(logging.WARNING) and not seen("DeepSpeed", "a warning")


def test_only_rank_zero_speaks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log.setup(1)  # even with -v
    assert not log.logger.isEnabledFor(logging.INFO) and log.logger.isEnabledFor(logging.ERROR)
    assert not seen("DeepSpeed", "a warning") and seen("DeepSpeed", "an error", logging.ERROR)
    monkeypatch.setenv("RANK", "0")
    log.setup(0)
    assert log.logger.isEnabledFor(logging.INFO)
