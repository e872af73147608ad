import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _offline_and_cached(tmp_path_factory):
    """No hub access in tests; built-in artifacts live in one cache shared by the whole session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LIGHTNING_RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "lightning_rlhf_cache"))
    yield
