"""What serving a LoRA adapter costs vLLM's sampling: the base model against the same model with LoRA enabled.

    python bench/vllm_lora_speed.py                    # SmolLM2-135M-Instruct, rank 16, 2 rounds of each
    python bench/vllm_lora_speed.py --rounds 3 --rank 8

Each row is a fresh process holding one ``vllm.LLM`` (float32, the settings of the SmolLM2 recipe's
generator), first without LoRA, then with ``enable_lora`` and a rank-``R`` adapter on the attention
projections named in every request, alternating for ``--rounds`` rounds so drift hits both alike. Each
process times 3 requests of 8 prompts x 8 samples x 24 new tokens (the recipe's batch) after a warm-up.

Writes ``docs/results/vllm_lora_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, run_worker, write_json, write_markdown  # noqa: E402


def worker(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_LOGGING_LEVEL"] = "WARNING"  # stdout's last line is the result: no shutdown messages after it
    from vllm import LLM, SamplingParams

    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.tasks import prepare

    prepare(spec["policy"])
    path = builtin_path(spec["policy"])
    kwargs = dict(
        dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2**30, max_model_len=256, seed=0
    )  # as the recipe's generator (vllm_arguments on CPU, configs/smollm2/arithmetic.yaml)
    kwargs["enable_chunked_prefill"] = False
    request = None
    if spec["rank"]:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=max(8, spec["rank"]), max_loras=1)
        folder = tempfile.mkdtemp()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        config = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules=targets, task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(path), config).save_pretrained(folder)
        request = LoRARequest("bench", 1, folder)
    llm = LLM(model=path, **kwargs)
    prompts = [{"prompt_token_ids": [1, *range(100 + i, 180 + i)]} for i in range(8)]
    params = SamplingParams(n=8, temperature=0.7, max_tokens=24, min_tokens=24, seed=1)
    llm.generate(prompts, params, use_tqdm=False, lora_request=request)  # warm-up
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        seconds.append(time.perf_counter() - start)
    llm.llm_engine.engine_core.shutdown()  # its processes end before the result is printed
    return {"rank": spec["rank"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="builtin:smollm2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "vllm_lora_speed"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for round_ in range(args.rounds):  # interleaved: base, then LoRA, each round
        for rank in (0, args.rank):
            row = {"round": round_, **run_worker(os.path.abspath(__file__), {"policy": args.policy, "rank": rank})}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = statistics.median(s for r in rows if not r["rank"] for s in r["seconds"])
    lora = statistics.median(s for r in rows if r["rank"] for s in r["seconds"])
    payload = {"policy": args.policy, "machine": f"CPU, {os.cpu_count()} cores", "rows": rows, "ratio": lora / base}
    write_json(args.out + ".json", payload)
    lines = [
        f"vLLM sampling, 8 prompts x 8 samples x 24 tokens, `{args.policy}` float32 "
        f"(`python bench/vllm_lora_speed.py`; {payload['machine']}); seconds per request, each process's 3 requests.",
        "",
        "| round | LoRA | seconds per request |",
        "|---|---|---|",
    ]
    for r in rows:
        what = f"rank {r['rank']} adapter" if r["rank"] else "off (base model)"
        lines.append(f"| {r['round']} | {what} | {', '.join(f'{s:.1f}' for s in r['seconds'])} |")
    lines += ["", f"Median with LoRA over median without: **{payload['ratio']:.1f}x**."]
    write_markdown(args.out + ".md", lines)


if __name__ == "__main__":
    main()
