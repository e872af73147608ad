"""Does RL visibly work on the built-in task? The quickstart per backend, and a long run against the proxy.

    python bench/builtin_task.py                      # -> docs/results/builtin_task.{json,md}
    python bench/builtin_task.py --backends transformers --long_steps 0 --json /tmp/task.json

* ``quickstart_<backend>``: ``lightning-rlhf fit --config configs/quickstart.yaml`` with the
  strategy's ``backend`` set (asynchronous, ``max_staleness: 1``, 100 updates), in a fresh process
  with a warm cache (the task is prepared first, untimed); its wall time and the gold win rate and KL
  before and after, from ``eval_summary.json``.
* ``long``: the same recipe run synchronously in one process (no generator process, transformers)
  for ``--long_steps`` updates at ``--long_beta``, evaluated every quarter: whether the gold win rate
  keeps rising, levels off or falls as the policy moves away from the SFT policy against an imperfect
  proxy (over-optimization, Gao et al. 2023).
* ``proxy_pair_accuracy``: the share of fresh gold-labelled pairs of SFT samples (1500 prompts, ties
  dropped) that the proxy ranks as the gold reward does.

docs/results.md, section 10, reads these numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import time

from common import RESULTS, ROOT, module_and_data, quiet_trainer, write_json, write_markdown

CONFIG = "configs/quickstart.yaml"


def quickstart(backend: str, workdir: str, timeout_s: float = 1200) -> dict:
    """The quickstart command with ``backend``, timed; its evaluation summary."""
    run_dir = os.path.join(workdir, f"quickstart_{backend}")
    command = ["lightning-rlhf", "fit", "--config", CONFIG, "--trainer.strategy.init_args.backend", backend]
    start = time.perf_counter()
    out = subprocess.run(
        [*command, "--trainer.default_root_dir", run_dir], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    summary_path = next(
        os.path.join(d, f) for d, _, files in os.walk(run_dir) for f in files if f == "eval_summary.json"
    )
    with open(summary_path) as f:
        summary = json.load(f)
    before, after = summary["before"], summary["after"]
    return {
        "run": f"quickstart_{backend}",
        "command": " ".join(command),
        "seconds": seconds,
        "gold_win_rate_before": before["eval/gold_win_rate"],
        "gold_win_rate_after": after["eval/gold_win_rate"],
        "gain": after["eval/gold_win_rate"] - before["eval/gold_win_rate"],
        "kl_after": after["eval/kl"],
    }


def long_run(steps: int, beta: float) -> dict:
    """The quickstart's recipe in one process for ``steps`` updates at ``beta``; the evaluation curve."""
    from lightning_rlhf.callbacks import GoldEvaluation
    from lightning_rlhf.tasks.copy import CopyGoldReward

    module, data = module_and_data(CONFIG, ["--model.init_args.beta", str(beta)])
    evaluation = GoldEvaluation(CopyGoldReward(), num_prompts=256, every_n_steps=max(1, steps // 4))
    start = time.perf_counter()
    quiet_trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[evaluation], default_root_dir=tempfile.mkdtemp()
    ).fit(module, data)
    return {
        "run": "long",
        "steps": steps,
        "beta": beta,
        "seconds": time.perf_counter() - start,
        "curve": [
            {"step": h["step"], "gold_win_rate": h["eval/gold_win_rate"], "kl": h["eval/kl"]}
            for h in evaluation.history
        ],
    }


def proxy_pair_accuracy(num_prompts: int = 1500) -> float:
    """Share of fresh gold-labelled pairs of SFT samples that the built-in proxy orders as the gold reward does."""
    from lightning_rlhf.models import builtin_root
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.tasks.copy.artifacts import _sft_preferences

    pairs = _sft_preferences(builtin_root(), num_prompts, seed=99)  # seeds 1 and 2 made the proxy's own data
    proxy = RewardModelScore("builtin:reward_model")
    prompts = [p["prompt"] for p in pairs]
    chosen = proxy(prompts, [p["chosen"] for p in pairs])
    rejected = proxy(prompts, [p["rejected"] for p in pairs])
    return (chosen > rejected).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "builtin_task.json"))
    parser.add_argument("--backends", nargs="+", default=None, help="default: vllm when installed, and transformers")
    parser.add_argument("--long_steps", type=int, default=1000, help="updates of the long run (0 skips it)")
    parser.add_argument("--long_beta", type=float, default=0.01)
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # untimed: the quickstart times below are warm
    backends = args.backends or (["vllm"] if importlib.util.find_spec("vllm") else []) + ["transformers"]
    workdir = tempfile.mkdtemp(prefix="builtin_task_")
    results = {"proxy_pair_accuracy": proxy_pair_accuracy(), "runs": []}
    for backend in backends:
        results["runs"].append(quickstart(backend, workdir))
        print(json.dumps(results["runs"][-1]), flush=True)
    if args.long_steps:
        results["runs"].append(long_run(args.long_steps, args.long_beta))
    write_json(args.json, results)
    lines = [
        f"Proxy: ranks {results['proxy_pair_accuracy']:.3f} of fresh pairs of SFT samples as the gold reward does.",
        "",
        "| run | gold win rate before -> after | gain | KL after | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r["run"] == "long":
            first, last = r["curve"][0], r["curve"][-1]
            path = ", ".join(f"{c['gold_win_rate']:.3f}" for c in r["curve"])
            lines.append(
                f"| long, {r['steps']} updates, beta {r['beta']} (curve: {path}) | {first['gold_win_rate']:.3f} -> "
                f"{last['gold_win_rate']:.3f} | {last['gold_win_rate'] - first['gold_win_rate']:+.3f} | "
                f"{last['kl']:.2f} | {r['seconds']:.0f} |"
            )
        else:
            lines.append(
                f"| {r['run']} | {r['gold_win_rate_before']:.3f} -> {r['gold_win_rate_after']:.3f} | {r['gain']:+.3f} | "
                f"{r['kl_after']:.2f} | {r['seconds']:.0f} |"
            )
    write_markdown(os.path.splitext(args.json)[0] + ".md", lines)


if __name__ == "__main__":
    main()
