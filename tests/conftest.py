"""Tiny models on a shared 2-core CPU: one intra-op thread per test. Matmuls of 64-wide layers
gain nothing from a second thread, and on a loaded machine OpenMP's spinning threads make them
10-100x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_command_logging():
    """Each command runs in a process of its own in real use; a handler that an earlier test's
    command set up (rmt_peft.log.setup) must not print into the next test's captured stderr."""
    import logging

    yield
    package_logger = logging.getLogger("rmt_peft")
    for handler in [h for h in package_logger.handlers if getattr(h, "_rmt_peft", False)]:
        package_logger.removeHandler(handler)
