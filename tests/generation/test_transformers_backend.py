import pytest
import torch
from transformers import GenerationConfig

from lightning_rlhf.generation import SamplingConfig, TransformersBackend, truncate_at_stop
from lightning_rlhf.generation.transformers_backend import sample
from lightning_rlhf.models import load_policy, load_tokenizer
from lightning_rlhf.rollout_batch import build_rollout_batch
from lightning_rlhf.rollout_forwards import response_logprobs
from lightning_rlhf.tokens import left_pad, prompt_token_ids


def test_truncate_at_stop_keeps_the_stop_token_and_drops_the_rest():
    assert truncate_at_stop([5, 6, 2, 7, 2], [-1.0, -2.0, -3.0, -4.0, -5.0], {2}) == (
        [5, 6, 2],
        [-1.0, -2.0, -3.0],
        "stop",
    )
    assert truncate_at_stop([5, 6], [-1.0, -2.0], {2}) == ([5, 6], [-1.0, -2.0], "length")


@pytest.mark.parametrize("temperature, k", [(0.7, 3), (1.3, 1), (0.0, 1)])
def test_sampling_draws_what_transformers_generate_draws(tiny_model_dir, temperature, k):
    """Our loop against ``generate`` itself, from the same RNG state: the same tokens and logits.

    Prompts of different lengths (left padding) and a second stop token that the untrained
    model samples often, so rows stop early and are padded while others go on.
    Greedy decoding too (``generate`` takes k=1 only there).
    """
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir).eval()
    prompts = prompt_token_ids(tokenizer, ["copy 1 2 3 =", "copy 4 5 6 7 8 9 =", "copy 0 =", "copy 7 7 7 7 ="])
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("3")]
    config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature or None,
        top_k=0,
        top_p=1.0,
        max_new_tokens=12,
        num_return_sequences=k,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(5)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    prefill_rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: prefill_rows.append(i[0].shape))
    torch.manual_seed(5)
    tokens, logits = sample(model, ids, mask, k, temperature, 12, stops, tokenizer.pad_token_id)
    hook.remove()

    assert torch.equal(tokens, expected.sequences[:, ids.shape[1] :])
    assert torch.allclose(logits, torch.stack(expected.logits, dim=1), atol=1e-5)
    if temperature > 0:  # (greedy, the untrained model never reaches a stop token)
        stopped = torch.isin(tokens, torch.tensor(stops)).any(-1)
        assert stopped.any() and (tokens[stopped, -1] == tokenizer.pad_token_id).any()  # the early-stop case ran
    assert prefill_rows[0] == ids.shape  # each prompt ran once for its k samples
    assert all(shape == (len(prompts) * k, 1) for shape in prefill_rows[1:])


def test_generate_shapes_versions_and_behaviour_logprobs(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    backend = TransformersBackend(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    backend.load_weights((), version=7)
    prompts = prompt_token_ids(tokenizer, ["copy 1 2 3 =", "copy 4 5 6 7 8 9 ="])  # different lengths: left padding
    torch.manual_seed(0)
    sampling = SamplingConfig(k=3, temperature=0.7, max_new_tokens=6)
    generations = backend.generate(prompts, sampling)

    assert len(generations.completion_ids) == 6 and generations.k == 3
    assert generations.policy_version == 7
    for tokens, logprobs, reason in zip(
        generations.completion_ids, generations.behavior_logprobs, generations.finish_reasons
    ):
        assert len(tokens) == len(logprobs) <= 6
        assert (reason == "stop") == (tokenizer.eos_token_id in tokens)
        if reason == "stop":
            assert tokens.index(tokenizer.eos_token_id) == len(tokens) - 1  # truncated right after the stop token
    # The sampler's temperature-scaled logprobs equal the training path's, token for token,
    # for both prompt lengths (left padding and position ids agree).
    rollouts = build_rollout_batch(generations, tokenizer.pad_token_id)
    with torch.no_grad():
        trained = response_logprobs(model, rollouts, sampling.temperature)
    assert torch.allclose(trained, rollouts.behavior_logprobs, atol=1e-4)
    assert rollouts.response_mask.sum() == sum(len(c) for c in generations.completion_ids)


def test_the_head_computes_logits_only_where_tokens_are_predicted(tiny_model_dir):
    """``logits_to_keep``: the sampling prefill's last position, the training forward's last t + 1 positions.

    Not the whole prompt's (batch x prompt x vocabulary floats, gigabytes for a long prompt and a real
    vocabulary); the logprobs are the same (the tests above and below compare them with whole forwards).
    """
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    backend = TransformersBackend(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    head_inputs = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_inputs.append(tuple(i[0].shape)))
    torch.manual_seed(0)
    generations = backend.generate(prompt_token_ids(tokenizer, ["copy 1 2 3 4 5 6 7 8 ="]), SamplingConfig(2, 1.0, 3))
    prefill = head_inputs[0]
    rollouts = build_rollout_batch(generations, tokenizer.pad_token_id)
    head_inputs.clear()
    with torch.no_grad():
        response_logprobs(model, rollouts, 1.0, share_prompts=False)
        whole = list(head_inputs)
        head_inputs.clear()
        response_logprobs(model, rollouts, 1.0)  # the two samples share their prompt: it runs once
    hook.remove()

    t, h = rollouts.response_ids.shape[1], model.config.hidden_size
    assert prefill == (1, 1, h)  # one prompt, its last position
    assert rollouts.prompt_length > 5 and t > 1
    assert whole == [(2, t + 1, h)]
    assert head_inputs == [(1, 1, h), (2, t - 1, h)]  # the prompt's last position, then the responses


def _sampled_rollouts(
    model,
    tokenizer,
    k: int,
    max_new_tokens: int,
    texts=("copy 1 2 3 =", "copy 4 5 6 7 8 9 =", "copy 0 =", "copy 1 2 3 ="),
):
    """k samples each of prompts of different lengths (left padding),
    shuffled (as a DPO pair order is not prompt-major)."""
    backend = TransformersBackend(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    prompts = prompt_token_ids(tokenizer, list(texts))
    torch.manual_seed(3)
    rollouts = build_rollout_batch(
        backend.generate(prompts, SamplingConfig(k, 1.0, max_new_tokens)), tokenizer.pad_token_id
    )
    return rollouts[torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("max_new_tokens", [6, 1])
def test_rollouts_sharing_a_prompt_run_it_once_with_the_whole_forwards_logprobs_and_gradients(
    tiny_model_dir, max_new_tokens
):
    """Prompt sharing in the training forward: the same logprobs and gradients, fewer prompt rows embedded.

    Four prompts, two of them the same text, three samples each, shuffled: three distinct prompts
    run once each, and every rollout's logprobs and the policy's gradients equal the whole
    forwards'. With one new token the second pass still runs (one token fed, its prediction unused).
    """
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir).train()
    rollouts = _sampled_rollouts(model, tokenizer, k=3, max_new_tokens=max_new_tokens)
    assert rollouts.response_mask.sum(-1).unique().numel() > 1 or max_new_tokens == 1  # ragged responses
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(tuple(i[0].shape)))
    results = {}
    for share in (False, True):
        model.zero_grad()
        embedded.clear()
        logprobs = response_logprobs(model, rollouts, 0.7, share_prompts=share)
        (logprobs * torch.linspace(0.5, 2.0, logprobs.numel()).view_as(logprobs)).sum().backward()
        results[share] = logprobs.detach(), [p.grad.clone() for p in model.parameters()], list(embedded)
    hook.remove()

    (whole, whole_grads, whole_rows), (shared, shared_grads, shared_rows) = results[False], results[True]
    p, t = rollouts.prompt_length, rollouts.response_ids.shape[1]
    assert whole_rows == [(12, p + t)]
    assert shared_rows == [(3, p), (12, max(t - 1, 1))]
    assert torch.allclose(shared, whole, atol=1e-5)
    assert (whole != 0).sum() == rollouts.response_mask.sum()
    for a, b in zip(shared_grads, whole_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_forwards_made_do_not_depend_on_the_data_and_checkpointing_runs_whole(tiny_model_dir):
    """The same two forwards whether prompts repeat or not, so ranks with different batches make the same calls.

    (Under ZeRO-3 every forward gathers parameters collectively.) ``share_prompts=False``, or a
    model that drops its cache in training (gradient checkpointing), runs one whole forward.
    """
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir).train()
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(i[0].shape[0]))
    distinct = _sampled_rollouts(
        model, tokenizer, k=1, max_new_tokens=4, texts=("copy 1 2 =", "copy 3 4 5 =", "copy 6 =")
    )
    runs = {}
    for share in (True, False):
        embedded.clear()
        with torch.no_grad():
            runs[share] = response_logprobs(model, distinct, 1.0, share_prompts=share), list(embedded)
    assert runs[True][1] == [3, 3] and runs[False][1] == [3]
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5)
    model.gradient_checkpointing_enable()
    rollouts = _sampled_rollouts(model, tokenizer, k=2, max_new_tokens=4)
    embedded.clear()
    response_logprobs(model, rollouts, 1.0).sum().backward()
    hook.remove()
    assert embedded == [len(rollouts)]


def test_response_logprobs_use_the_temperature(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    backend = TransformersBackend(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    torch.manual_seed(0)
    rollouts = build_rollout_batch(
        backend.generate(prompt_token_ids(tokenizer, ["copy 1 2 ="]), SamplingConfig(2, 1.0, 4)), tokenizer.pad_token_id
    )
    with torch.no_grad():
        hot, cold = response_logprobs(model, rollouts, 2.0), response_logprobs(model, rollouts, 0.5)
        logits = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).logits[
            :, rollouts.prompt_length - 1 : -1
        ]
    expected = (
        torch.log_softmax(logits / 2.0, -1).gather(-1, rollouts.response_ids[..., None]).squeeze(-1)
        * rollouts.response_mask
    )
    assert torch.allclose(hot, expected, atol=1e-5)
    assert not torch.allclose(hot, cold)


def test_a_64_bit_base_seed_samples_and_stays_reproducible(tiny_model_dir):
    # torch.initial_seed() may be any 64-bit number; each call's seed must still fit torch.manual_seed
    from lightning_rlhf.generation.base import call_seed

    assert 0 <= call_seed(2**64 - 1, 7) < 2**63
    assert call_seed(5, 2) == 5 * 1_000_003 + 2  # small seeds: the streams of earlier versions, unchanged
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = prompt_token_ids(tokenizer, ["copy 1 2 3 ="])
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=4)
    runs = [
        TransformersBackend(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=2**64 - 1).generate(
            prompts, sampling
        )
        for _ in range(2)
    ]
    assert runs[0].completion_ids == runs[1].completion_ids
