import os

# Before anything imports transformers/datasets, which read these once: tests never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a run that aborts or crashes (in a subprocess, too) prints every thread's Python stack
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch  # under `-n 2`, one torch thread per worker: two threads each would fight over the two cores

        torch.set_num_threads(1)
    config.addinivalue_line(
        "markers",
        "slow: starts processes (generators, vLLM, DDP ranks, scripts) or trains for many steps; "
        "`pytest -m 'not slow'` skips them while iterating, CI runs everything",
    )


def pytest_collection_modifyitems(config, items):
    """The slow tests first (each keeps its order): under ``-n 2`` the long runs start early and the quick tests
    fill the gaps at the end, instead of one worker finishing a long run alone while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory):
    """The session's folder, shared by its workers under pytest-xdist (``-n 2``): each worker's own is inside it."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def _offline_and_cached(shared_tmp_path):
    """The built-in task, prepared once into a cache shared by the whole session (and its subprocesses).

    Set ``LIGHTNING_RLHF_CACHE`` to a folder of your own to keep it between sessions (about 2 minutes to prepare).
    Under pytest-xdist (``-n 2``) the workers share it; the first prepares, the other waits.
    """
    os.environ.setdefault("LIGHTNING_RLHF_CACHE", str(shared_tmp_path / "lightning_rlhf_cache"))
    import torch

    from lightning_rlhf.tasks.copy import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the other worker sleeps on the lock meanwhile: use both cores
    try:
        prepare()
    finally:
        torch.set_num_threads(threads)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny Llama (head size 32) with the built-in word-level tokenizer, saved like a hub checkpoint."""
    from lightning_rlhf.tasks.copy import make_base_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_base_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def builtin_models():
    """Paths of the built-in SFT policy and proxy reward model (trained once per test session)."""
    from lightning_rlhf.builtin import builtin_path

    return {"sft": builtin_path("builtin:sft"), "reward_model": builtin_path("builtin:reward_model")}


@pytest.fixture(scope="session")
def vllm_probe():
    """Runs ``tests/generation/vllm_probe.py`` with its arguments in a process of its own (5 minutes at most);
    its JSON."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generation", "vllm_probe.py")

    def run(*args: str):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")))

    return run


@pytest.fixture(scope="session")
def quiet_trainer():
    """A CPU ``Trainer`` for ``max_steps`` that writes nothing (no logger, checkpoint, progress bar or summary)."""
    import lightning as L

    def make(max_steps: int = 1, **kwargs) -> L.Trainer:
        return L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )

    return make


@pytest.fixture
def two_prompts():
    """Generations of 2 prompts of 2 and 1 tokens, k=2: completions of 3, 1, 2 and 0 tokens; the first and third
    ended with eos (for the rollout batch, its forwards and its scoring)."""
    from lightning_rlhf.generation import Generations

    return Generations(
        prompt_ids=[[5, 6], [7]],
        completion_ids=[[1, 2, 3], [4], [8, 9], []],
        behavior_logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], []],
        finish_reasons=["stop", "length", "stop", "length"],
        policy_version=3,
        k=2,
    )
