import pytest

from tests.data_helpers import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from megabridge.training.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
