"""vLLM samples: every sample of a request draws its own noise, and a repeated run draws the same."""

import importlib.util

import pytest

from lightning_rlhf.generation.vllm_backend import prompt_seeds

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")


@pytest.mark.parametrize("request_seed", [0, 12345, 2**63 - 1])
def test_no_two_samples_of_a_request_share_a_seed(request_seed):
    """vLLM seeds the j-th sample of a prompt ``seed + j``: the prompts' seeds must be k apart at least."""
    k = 4
    children = [seed + j for seed in prompt_seeds(request_seed, 64, k) for j in range(k)]
    assert len(set(children)) == 64 * k and all(0 <= s < 2**63 for s in children)
    assert prompt_seeds(request_seed, 64, k) == prompt_seeds(request_seed, 64, k)
    assert set(prompt_seeds(request_seed + 1, 64, k)).isdisjoint(children)  # the next request draws anew


@pytest.mark.slow
@needs_vllm
def test_the_same_prompt_eight_times_gives_eight_different_pairs_and_a_repeat_gives_them_again(
    tiny_model_dir, vllm_probe
):
    first, repeat = vllm_probe("--model", tiny_model_dir, "--mode", "samples")
    pairs = {tuple(map(tuple, first[2 * i : 2 * i + 2])) for i in range(8)}
    assert len(pairs) == 8  # with one seed per request: 1 distinct pair (the j-th samples all alike)
    assert first == repeat
