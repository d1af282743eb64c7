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
