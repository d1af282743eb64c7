import pytest

from rmt_peft.data.tokenizer import offline_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return offline_tokenizer()
