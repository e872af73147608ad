"""Does RL visibly work on the built-in task, for every seed and CPU? The quickstart per seed, backend and ISA.

    python bench/builtin_task.py                      # -> docs/results/builtin_task.{json,md}
    python bench/builtin_task.py --backends transformers --seeds 0 1 --isas native --long_steps 0 --json /tmp/t.json

For each ``--isas`` entry the built-in task is prepared from an **empty cache** (as on a fresh
install; timed), in a process whose kernels run at that instruction set: ``native`` is what torch
picks on this CPU; ``avx2`` forces ATen's kernels (``ATEN_CPU_CAPABILITY``), MKL's BLAS
(``MKL_ENABLE_INSTRUCTIONS``) and oneDNN (``ONEDNN_MAX_CPU_ISA``) to AVX2, the path of a CPU without
AVX-512. Then, with that cache and that instruction set:

* ``proxy_pair_accuracy``: the share of fresh gold-labelled pairs of SFT samples (1500 prompts, ties
  dropped) that the prepared proxy ranks as the gold reward does.
* ``quickstart``: ``lightning-rlhf fit --config configs/quickstart.yaml`` with the strategy's
  ``backend`` and ``seed_everything`` set (asynchronous, ``max_staleness: 1``, 100 updates), in a fresh
  process, for each of ``--seeds``; its wall time and the gold win rate and KL before and after, from
  ``eval_summary.json``. The table gives the median and range over seeds of the gain and the KL.
* ``long`` (native only): the same recipe run synchronously in one process (no generator process,
  transformers) for ``--long_steps`` updates at ``--long_beta``, evaluated every quarter: whether the gold
  win rate keeps rising, levels off or falls as the policy moves away from the SFT policy against an
  imperfect proxy (over-optimization, Gao et al. 2023).

``--proxy_recipes`` (instead of all that): with each instruction set's prepared task, the proxy
trained again from ``builtin:sft_large`` for each of ``--seeds`` by task v5's recipe (150 steps at a
constant learning rate of 1e-3) and by v6's (300 steps, warm-up and linear decay to 0), each judged
on the same fresh pairs: how much the proxy depends on the seed and on the CPU's kernels.

docs/results.md, section 10, reads these numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import RESULTS, ROOT, module_and_data, quiet_trainer, write_json, write_markdown

CONFIG = "configs/quickstart.yaml"
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def quickstart(backend: str, seed: int, workdir: str, env: dict, timeout_s: float = 1200) -> dict:
    """The quickstart command with ``backend`` and ``seed``, timed; its evaluation summary."""
    run_dir = os.path.join(workdir, f"quickstart_{backend}_{seed}")
    command = ["lightning-rlhf", "fit", "--config", CONFIG, "--trainer.strategy.init_args.generation.backend", backend]
    command += ["--seed_everything", str(seed)]
    start = time.perf_counter()
    out = subprocess.run(
        [*command, "--trainer.default_root_dir", run_dir],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
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
        "run": "quickstart",
        "backend": backend,
        "seed": seed,
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


def proxy_pair_accuracy(folder: str | None = None, num_prompts: int = 1500) -> float:
    """Share of fresh gold-labelled pairs of SFT samples that a proxy (default: the built-in) orders as gold does."""
    from lightning_rlhf.builtin import builtin_root
    from lightning_rlhf.tasks.copy.artifacts import _sft_preferences, pair_accuracy

    # seeds 1 and 2 made the proxy's own data, 3 its check during preparation
    pairs = _sft_preferences(builtin_root(), num_prompts, seed=99)
    return pair_accuracy(folder or builtin_root() / "reward_model", pairs)


def prepare_and_check() -> dict:
    """Prepare the built-in task into ``$LIGHTNING_RLHF_CACHE`` (timed) and measure its proxy (a worker's job)."""
    from lightning_rlhf.builtin import builtin_root
    from lightning_rlhf.tasks.copy import prepare

    start = time.perf_counter()
    prepare()
    seconds = time.perf_counter() - start
    with open(builtin_root() / "reward_model" / "config.json") as f:
        config = json.load(f)
    return {
        "prepare_seconds": seconds,
        "proxy_pair_accuracy": proxy_pair_accuracy(),
        "proxy_check_accuracy": config.get("proxy_pair_accuracy"),
        "proxy_seed": config.get("proxy_seed"),
    }


PROXY_RECIPES = {
    "v5": dict(steps=150, schedule="constant", warmup=0),
    "v6": dict(steps=300, schedule="linear", warmup=15),
}


def proxy_recipe_accuracy(recipe: str, seed: int) -> float:
    """The proxy trained again by ``recipe`` with ``seed`` (into a temporary folder); its pair accuracy."""
    import lightning as L
    import torch

    from lightning_rlhf.builtin import builtin_root
    from lightning_rlhf.data.datamodules import PreferenceDataModule
    from lightning_rlhf.modules.reward_model import RewardModel

    spec, root = PROXY_RECIPES[recipe], builtin_root()
    L.seed_everything(seed, verbose=False)
    module = RewardModel(
        model=str(root / "sft_large"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_schedule=spec["schedule"],
        warmup_steps=spec["warmup"],
    )
    data = PreferenceDataModule(dataset=str(root / "data" / "preferences_with_sft_samples.jsonl"), batch_size=64)
    quiet_trainer(max_steps=spec["steps"], accelerator="cpu", devices=1).fit(module, data)
    folder = tempfile.mkdtemp(prefix="proxy_recipe_")
    module.save_pretrained(folder)
    return proxy_pair_accuracy(folder)


def _worker(job: str, env: dict, *extra: str, timeout_s: float = 1800) -> dict:
    """Run ``job`` of this script in a fresh process with ``env`` (the instruction set is fixed at torch's import)."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", job, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):+.3f} ({min(values):+.3f} to {max(values):+.3f})"


def markdown(results: dict) -> list[str]:
    lines = [
        "| CPU kernels | proxy: pairs of SFT samples ranked as gold does (check in preparation; seed) "
        "| preparation (s) |",
        "|---|---|---|",
    ]
    for isa, p in results["preparations"].items():
        lines.append(
            f"| {isa} ({p['cpu_capability']}) | {p['proxy_pair_accuracy']:.3f} ({p['proxy_check_accuracy']:.3f}; "
            f"seed {p['proxy_seed']}) | {p['prepare_seconds']:.0f} |"
        )
    lines += [
        "",
        "| CPU kernels | backend | seeds | gold win rate before | gain, median (range) | seeds with gain >= 0.15 "
        "| KL after, median (range) | wall time (s), median | gain per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    quick = [r for r in results["runs"] if r["run"] == "quickstart"]
    for isa in results["preparations"]:
        for backend in dict.fromkeys(r["backend"] for r in quick):
            rs = [r for r in quick if r["isa"] == isa and r["backend"] == backend]
            if not rs:
                continue
            gains, kls = [r["gain"] for r in rs], [r["kl_after"] for r in rs]
            per_seed = ", ".join(f"{r['seed']}: {r['gain']:+.3f}" for r in rs)
            lines.append(
                f"| {isa} | {backend} | {len(rs)} | {statistics.median(r['gold_win_rate_before'] for r in rs):.3f} "
                f"| {_spread(gains)} | {sum(g >= 0.15 for g in gains)} of {len(rs)} "
                f"| {statistics.median(kls):.2f} ({min(kls):.2f} to {max(kls):.2f}) "
                f"| {statistics.median(r['seconds'] for r in rs):.0f} "
                f"| {per_seed} |"
            )
    for r in results["runs"]:
        if r["run"] == "long":
            first, last = r["curve"][0], r["curve"][-1]
            path = ", ".join(f"{c['gold_win_rate']:.3f}" for c in r["curve"])
            lines += [
                "",
                f"Long run (native, transformers, one process): {r['steps']} updates at beta {r['beta']}: "
                f"gold win rate {path} (every quarter), {first['gold_win_rate']:.3f} -> {last['gold_win_rate']:.3f}, "
                f"KL {last['kl']:.2f}, {r['seconds']:.0f} s.",
            ]
    return lines


def compare_proxy_recipes(args: argparse.Namespace) -> None:
    workdir = args.cache_root or tempfile.mkdtemp(prefix="proxy_recipes_")
    results = {}
    for isa in args.isas:
        env = {**os.environ, **ISA_ENV[isa], "LIGHTNING_RLHF_CACHE": os.path.join(workdir, f"cache_{isa}")}
        _worker("prepare", env)  # reuses a prepared cache
        seeds = [str(seed) for seed in args.seeds]
        results[isa] = _worker("recipes", env, "--seeds", *seeds, timeout_s=3600)
        print(json.dumps({isa: results[isa]}), flush=True)
    write_json(args.json, results)
    lines = [
        "| CPU kernels | " + " | ".join(results[args.isas[0]]) + " |",
        "|---|" + "---|" * len(results[args.isas[0]]),
    ]
    lines += [f"| {isa} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |" for isa, r in results.items()]
    write_markdown(os.path.splitext(args.json)[0] + ".md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "builtin_task.json"))
    parser.add_argument("--backends", nargs="+", default=None, help="default: transformers, and vllm when installed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seed_everything of each run")
    parser.add_argument("--isas", nargs="+", default=["native", "avx2"], choices=sorted(ISA_ENV))
    parser.add_argument("--long_steps", type=int, default=1000, help="updates of the long run (0 skips it)")
    parser.add_argument("--long_beta", type=float, default=0.01)
    parser.add_argument("--append", action="store_true", help="keep --json's results for the other --isas")
    parser.add_argument("--proxy_recipes", action="store_true", help="compare the v5 and v6 proxy recipes per seed")
    parser.add_argument("--cache_root", default=None, help="--proxy_recipes: a folder with a prepared cache_<isa> each")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "prepare":
        import torch

        print(json.dumps({**prepare_and_check(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
        return
    if args.worker == "recipes":
        print(
            json.dumps(
                {f"{r} seed {seed}": proxy_recipe_accuracy(r, seed) for r in PROXY_RECIPES for seed in args.seeds}
            )
        )
        return
    if args.worker == "long":
        from lightning_rlhf.tasks.copy import prepare

        prepare()
        print(json.dumps(long_run(args.long_steps, args.long_beta)))
        return
    if args.proxy_recipes:
        return compare_proxy_recipes(args)
    backends = args.backends or ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    workdir = tempfile.mkdtemp(prefix="builtin_task_")
    results: dict = {"preparations": {}, "runs": []}
    if args.append and os.path.exists(args.json):  # keep the other instruction sets' results
        with open(args.json) as f:
            kept = json.load(f)
        results["preparations"] = {k: v for k, v in kept["preparations"].items() if k not in args.isas}
        results["runs"] = [r for r in kept["runs"] if r["isa"] not in args.isas]
    for isa in args.isas:
        env = {**os.environ, **ISA_ENV[isa], "LIGHTNING_RLHF_CACHE": os.path.join(workdir, f"cache_{isa}")}
        results["preparations"][isa] = _worker("prepare", env)
        print(json.dumps({"isa": isa, **results["preparations"][isa]}), flush=True)
        for seed in args.seeds:
            for backend in backends:
                results["runs"].append({"isa": isa, **quickstart(backend, seed, workdir, env)})
                print(json.dumps(results["runs"][-1]), flush=True)
        if isa == "native" and args.long_steps:
            extra = ("--long_steps", str(args.long_steps), "--long_beta", str(args.long_beta))
            results["runs"].append({"isa": isa, **_worker("long", env, *extra)})
    write_json(args.json, results)
    write_markdown(os.path.splitext(args.json)[0] + ".md", markdown(results))


if __name__ == "__main__":
    main()
