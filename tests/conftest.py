import os

# Before anything imports transformers/datasets, which read these once: tests never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (generators, vLLM, DDP ranks, scripts) or trains for many steps; `pytest -m 'not slow'` skips them while iterating, CI runs everything")


@pytest.fixture(scope="session", autouse=True)
def _offline_and_cached(tmp_path_factory):
    """Built-in artifacts live in one cache shared by the whole session (and its subprocesses)."""
    os.environ.setdefault("LIGHTNING_RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "lightning_rlhf_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny Llama (head size 32) with the built-in word-level tokenizer, saved like a hub checkpoint."""
    from lightning_rlhf.data.builtin import make_base_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_base_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def builtin_models():
    """Paths of the built-in SFT policy and proxy reward model (trained once per test session)."""
    from lightning_rlhf.data.builtin import builtin_artifact

    return {"sft": builtin_artifact("sft"), "reward_model": builtin_artifact("reward_model")}
