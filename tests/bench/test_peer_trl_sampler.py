"""bench/peer_trl.py's ``trl_our_parts`` run hands TRL our sampling loop in place of ``generate``:
it must draw the same."""

import importlib.util
import os
import sys

import pytest
import torch
from transformers import GenerationConfig

from lightning_rlhf.models import load_policy, load_tokenizer
from lightning_rlhf.tokens import left_pad, prompt_token_ids

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def _peer_trl():
    sys.path.insert(0, BENCH)  # the benchmark imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("peer_trl", os.path.join(BENCH, "peer_trl.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCH)


def test_the_stand_in_for_generate_returns_what_generate_returns(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_policy(tiny_model_dir).eval()
    ids, mask = left_pad(
        prompt_token_ids(tokenizer, ["copy 1 2 3 =", "copy 4 5 6 7 8 9 ="] * 2), tokenizer.pad_token_id
    )
    config = GenerationConfig(  # what TRL's OnlineDPOTrainer builds, with its defaults
        max_new_tokens=8,
        do_sample=True,
        temperature=0.7,
        top_k=50,  # more than the vocabulary: keeps every token
        top_p=1.0,
        repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("3")],
    )
    torch.manual_seed(0)
    expected = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    generate = _peer_trl()._our_sampler_as_generate(policy, tokenizer)
    torch.manual_seed(0)
    assert torch.equal(generate(input_ids=ids, attention_mask=mask, generation_config=config), expected)

    config.top_p = 0.9
    with pytest.raises(RuntimeError, match="temperature only"):
        generate(input_ids=ids, attention_mask=mask, generation_config=config)
