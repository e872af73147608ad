"""vLLM samples: every sample of a request draws its own seed (the engine's test is in tests/test_export.py)."""

import pytest

from lightning_rlhf.generation.vllm_backend import prompt_seeds


@pytest.mark.parametrize("request_seed", [0, 12345, 2**63 - 1])
def test_no_two_samples_of_a_request_share_a_seed(request_seed):
    """vLLM seeds the j-th sample of a prompt ``seed + j``: the prompts' seeds must be k apart at least."""
    k = 4
    children = [seed + j for seed in prompt_seeds(request_seed, 64, k) for j in range(k)]
    assert len(set(children)) == 64 * k and all(0 <= s < 2**63 for s in children)
    assert prompt_seeds(request_seed, 64, k) == prompt_seeds(request_seed, 64, k)
    assert set(prompt_seeds(request_seed + 1, 64, k)).isdisjoint(children)  # the next request draws anew
