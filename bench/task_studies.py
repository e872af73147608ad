"""Two of the paper's questions on the built-in task, 5 seeds each: compute trade-offs, and the proxy's scale.

    python bench/task_studies.py --study tradeoffs     # -> docs/results/tradeoffs.{json,md,png}
    python bench/task_studies.py --study proxy_scale   # -> docs/results/proxy_scale.{json,md,png}
    python bench/task_studies.py --study size_confound # -> docs/results/size_confound.{json,md,png}
    python bench/task_studies.py --study tradeoffs --seeds 0 --batches 8 --json /tmp/t.json   # a smoke test

* ``tradeoffs`` (Noukhovitch et al. 2025, Sec. 4.2: more updates per generated batch, and more
  samples per prompt): the quickstart's online DPO recipe, synchronous in one process (transformers),
  for ``--batches`` generated batches of 32 prompts, as k = 2 with 1, 2 and 4 updates per batch
  (``num_epochs``) and as k = 4 (best against worst) with one. The gold win rate and KL every quarter
  of the run, against the training wall time up to that point (evaluation excluded).
* ``proxy_scale`` (the paper's reward-model scale question): a second proxy trained by the built-in
  recipe (the same pairs, steps and schedule) from ``builtin:sft``, the small policy's own shape (2
  layers, hidden 64, 0.1M parameters) instead of ``builtin:sft_large`` (1.1M); both judged on the same
  fresh pairs of SFT samples, then online DPO on the small policy against each, on-policy (N = 1) and
  16 batches stale (N = 16), as in ``bench/offpolicy_sweep.py`` (64 updates, lr 1e-3 decaying, beta 0.5).
* ``size_confound`` (does robustness to staleness grow with policy size? Sec. 3.2): in the sweep the
  proxy was trained from ``builtin:sft_large``, the large policy's own starting point, and the learning
  rate was chosen on the small policy. Here the proxy is trained by the built-in recipe from an
  *independent* large SFT model (the same recipe from another random initialization, seed 1), the
  large policy's learning rate and beta are chosen on the large policy at N = 1 by the sweep's grid rule
  (``GRID_LRS`` x beta 0.1/0.5, best mean gold win rate; ``--grid_seeds``, by default one seed where the sweep
  had two, to fit the time we had), and online DPO runs at ``--ns`` on
  both policies against that proxy (the small policy with its sweep choice, lr 1e-3 and beta 0.5).

docs/results.md, section 11, reads these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from builtin_task import proxy_pair_accuracy

from common import RESULTS, mean_std, module_and_data, pyplot, quiet_trainer, write_json, write_markdown

TRADEOFFS = {  # name: (k, num_epochs)
    "k2": (2, 1),
    "k2_epochs2": (2, 2),
    "k2_epochs4": (2, 4),
    "k4_best_vs_worst": (4, 1),
}


def timed_evaluation(every_n_steps: int):
    """A :class:`GoldEvaluation` that also records the training seconds so far, its own time excluded."""
    from lightning_rlhf.callbacks import GoldEvaluation
    from lightning_rlhf.tasks.copy import CopyGoldReward

    class TimedGoldEvaluation(GoldEvaluation):
        start: float | None = None
        eval_seconds = 0.0

        def _run(self, trainer, module):
            now = time.perf_counter()
            self.start = self.start or now
            metrics = super()._run(trainer, module)
            metrics["train_seconds"] = now - self.start - self.eval_seconds
            self.eval_seconds += time.perf_counter() - now
            return metrics

    return TimedGoldEvaluation(CopyGoldReward(), num_prompts=256, every_n_steps=every_n_steps)


def run_tradeoff(name: str, seed: int, batches: int) -> dict:
    k, epochs = TRADEOFFS[name]
    overrides = ["--seed_everything", str(seed), "--model.init_args.k", str(k)]
    overrides += ["--model.init_args.num_epochs", str(epochs)]
    module, data = module_and_data("configs/quickstart.yaml", overrides)
    evaluation = timed_evaluation(every_n_steps=max(1, batches // 4) * epochs)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=1,
        max_steps=batches * epochs,
        callbacks=[evaluation],
        default_root_dir=tempfile.mkdtemp(prefix="tradeoffs_"),
    )
    trainer.fit(module, data)
    curve = [
        {"batches": h["step"] // epochs, "updates": h["step"], "seconds": h["train_seconds"]}
        | {"gold_win_rate": h["eval/gold_win_rate"], "kl": h["eval/kl"]}
        for h in evaluation.history
    ]
    return {"study": "tradeoffs", "run": name, "k": k, "num_epochs": epochs, "seed": seed, "curve": curve}


def train_small_proxy(folder: str) -> float:
    """The built-in proxy's recipe, started from ``builtin:sft`` (the small policy's shape); its pair accuracy."""
    from lightning_rlhf.builtin import builtin_root
    from lightning_rlhf.rewards.model import save_reward_normalization
    from lightning_rlhf.tasks.copy.artifacts import _fit_reward_model, _sft_samples

    root = builtin_root()
    _fit_reward_model(root / "data" / "preferences_with_sft_samples.jsonl", root / "sft", seed=0, out=folder)
    save_reward_normalization(folder, *_sft_samples(root, 512, k=2, temperature=0.7, seed=2))
    return proxy_pair_accuracy(folder)


def run_proxy_scale(proxy: str, proxy_path: str, n: int, seed: int, updates: int) -> dict:
    from offpolicy_sweep import run_one

    record = run_one("online_dpo", n, seed, updates, 256, lr=1e-3, strength=0.5, reward_model=proxy_path)
    return {"study": "proxy_scale", "proxy": proxy, **record}


def _cells(runs: list[dict]) -> tuple[float, str]:
    """The mean gold win rate of ``runs`` (seeds of one setting) and their table cells: seeds, mean ± sd, per seed."""
    win, kl = mean_std([r["gold_win_rate"] for r in runs]), mean_std([r["kl"] for r in runs])
    per_seed = ", ".join(f"{r['gold_win_rate']:.3f}" for r in runs)
    return win[0], f"{len(runs)} | {win[0]:.3f} ± {win[1]:.3f} | {kl[0]:.2f} ± {kl[1]:.2f} | {per_seed}"


def independent_proxy(workdir: str) -> tuple[str, float]:
    """A proxy by the built-in recipe from a large SFT model of another initialization; its folder and accuracy."""
    from lightning_rlhf.builtin import builtin_root
    from lightning_rlhf.rewards.model import save_reward_normalization
    from lightning_rlhf.tasks.copy.artifacts import (
        _fit_reward_model,
        _sft_samples,
        _train_sft,
        make_base_model,
        make_tokenizer,
    )

    root, other = builtin_root(), Path(workdir)
    os.symlink(root / "data", other / "data")  # the same demonstrations
    tokenizer = make_tokenizer()
    make_base_model(tokenizer, seed=1, size="base_large").save_pretrained(other / "base_large")
    tokenizer.save_pretrained(other / "base_large")
    _train_sft(other, "base_large", "sft_large")  # the built-in recipe, from the other initialization
    folder = str(other / "reward_model")
    _fit_reward_model(root / "data" / "preferences_with_sft_samples.jsonl", other / "sft_large", seed=0, out=folder)
    save_reward_normalization(folder, *_sft_samples(root, 512, k=2, temperature=0.7, seed=2))
    return folder, proxy_pair_accuracy(folder)


def run_size_confound(args: argparse.Namespace, json_path: str) -> None:
    from offpolicy_sweep import GRID_LRS, choose, run_one, slope

    proxy, accuracy = independent_proxy(tempfile.mkdtemp(prefix="independent_proxy_"))
    print(json.dumps({"independent_proxy_pair_accuracy": accuracy}), flush=True)
    grid = []
    for lr in GRID_LRS:
        for beta in (0.1, 0.5):
            for seed in args.grid_seeds:
                grid.append(run_one("online_dpo", 1, seed, args.updates, 256, "large", lr, beta, proxy))
                print(json.dumps(grid[-1]), flush=True)
    chosen = choose(grid)["online_dpo"]
    records = []
    for seed in args.seeds:
        for n in args.ns:
            for policy, (lr, beta) in {"small": (1e-3, 0.5), "large": (chosen["lr"], chosen["strength"])}.items():
                records.append(run_one("online_dpo", n, seed, args.updates, 256, policy, lr, beta, proxy))
                print(json.dumps(records[-1]), flush=True)
    payload = {"workload": vars(args), "proxy_pair_accuracy": accuracy, "chosen_large": chosen}
    write_json(json_path, {**payload, "grid": grid, "runs": records})
    lines = [
        f"Independent proxy: ranks {accuracy:.3f} of fresh pairs of SFT samples as the gold reward does. "
        f"Chosen on the large policy at N = 1: lr {chosen['lr']:g}, beta {chosen['strength']:g} "
        f"(mean gold win rate {chosen['gold_win_rate']:.3f}).",
        "",
        f"| lr | beta | gold win rate, large policy at N = 1 (seeds {', '.join(map(str, args.grid_seeds))}) |",
        "|---|---|---|",
    ]
    for lr in GRID_LRS:
        for beta in (0.1, 0.5):
            cell = [r["gold_win_rate"] for r in grid if r["lr"] == lr and r["beta"] == beta]
            lines.append(f"| {lr:g} | {beta:g} | {', '.join(f'{w:.3f}' for w in cell)} |")
    lines += [
        "",
        "| policy | N | seeds | gold win rate, mean ± sd | KL, mean ± sd | per seed |",
        "|---|---|---|---|---|---|",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for policy in ("small", "large"):
        wins = []
        for n in args.ns:
            win, cells = _cells([r for r in records if r["policy_key"] == policy and r["n"] == n])
            wins.append(win)
            lines.append(f"| {policy} | {n} | {cells} |")
        ax.plot(args.ns, wins, marker="o", label=policy)
    lines.append("")
    for policy in ("small", "large"):
        b, se = slope([r for r in records if r["policy_key"] == policy])
        lines.append(f"Slope per doubling of N, {policy}: {b:+.4f} ± {se:.4f}.")
    ax.set(xscale="log", xlabel="N (batches per policy snapshot)", ylabel="gold win rate (mean of seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(json_path)[0] + ".png", dpi=120)
    write_markdown(os.path.splitext(json_path)[0] + ".md", lines)


def report_tradeoffs(records: list[dict], json_path: str) -> None:
    lines = [
        "| run | k | updates per batch | seeds | gold win rate, mean ± sd | KL, mean ± sd | train seconds, mean "
        "| gold win rate per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plt = pyplot()
    fig, (ax_time, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name in TRADEOFFS:
        rs = [r for r in records if r["run"] == name]
        if not rs:
            continue
        final = [r["curve"][-1] for r in rs]
        win, kl = mean_std([f["gold_win_rate"] for f in final]), mean_std([f["kl"] for f in final])
        per_seed = ", ".join(f"{f['gold_win_rate']:.3f}" for f in final)
        lines.append(
            f"| {name} | {rs[0]['k']} | {rs[0]['num_epochs']} | {len(rs)} | {win[0]:.3f} ± {win[1]:.3f} "
            f"| {kl[0]:.2f} ± {kl[1]:.2f} | {statistics.mean(f['seconds'] for f in final):.0f} | {per_seed} |"
        )
        points = list(zip(*(r["curve"] for r in rs)))  # the same evaluation points in every seed
        mean = {key: [statistics.mean(p[key] for p in point) for point in points] for key in ("seconds", "kl")}
        wins = [statistics.mean(p["gold_win_rate"] for p in point) for point in points]
        ax_time.plot(mean["seconds"], wins, marker="o", label=name)
        ax_kl.plot(mean["kl"], wins, marker="o", label=name)
    ax_time.set(xlabel="training seconds (evaluation excluded)", ylabel="gold win rate (mean of seeds)")
    ax_kl.set(xlabel="KL to the SFT policy", ylabel="gold win rate (mean of seeds)")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(json_path)[0] + ".png", dpi=120)
    write_markdown(os.path.splitext(json_path)[0] + ".md", lines)


def report_proxy_scale(records: list[dict], accuracies: dict[str, float], json_path: str) -> None:
    lines = [
        "| proxy | pairs of SFT samples ranked as gold does | N | seeds | gold win rate, mean ± sd | KL, mean ± sd "
        "| gold win rate per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for proxy, accuracy in accuracies.items():
        ns = sorted({r["n"] for r in records if r["proxy"] == proxy})
        wins = []
        for n in ns:
            win, cells = _cells([r for r in records if r["proxy"] == proxy and r["n"] == n])
            wins.append(win)
            lines.append(f"| {proxy} | {accuracy:.3f} | {n} | {cells} |")
        ax.plot(ns, wins, marker="o", label=f"{proxy} ({accuracy:.2f} of pairs)")
    ax.set(xscale="log", xlabel="N (batches per policy snapshot)", ylabel="gold win rate (mean of seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(json_path)[0] + ".png", dpi=120)
    write_markdown(os.path.splitext(json_path)[0] + ".md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, choices=["tradeoffs", "proxy_scale", "size_confound"])
    parser.add_argument("--json", default=None, help="default: docs/results/<study>.json")
    parser.add_argument(
        "--grid_seeds", type=int, nargs="+", default=[0], help="size_confound: seeds of the grid (the sweep's: 0 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tradeoffs: one seed, 4 batches (a smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--batches", type=int, default=100, help="tradeoffs: generated batches per run")
    parser.add_argument("--updates", type=int, default=64, help="proxy_scale: updates per run")
    parser.add_argument(
        "--ns", type=int, nargs="+", default=None, help="values of N (proxy_scale: 1 16; size_confound: 1 16 64)"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.batches = [0], 4
    json_path = args.json or os.path.join(RESULTS, f"{args.study}.json")
    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.tasks.copy import prepare

    prepare()
    records = []
    if args.study == "size_confound":
        args.ns = args.ns or [1, 16, 64]
        return run_size_confound(args, json_path)
    args.ns = args.ns or [1, 16]
    if args.study == "tradeoffs":
        for seed in args.seeds:
            for name in TRADEOFFS:  # interleaved, so the machine's drift hits every run alike
                records.append(run_tradeoff(name, seed, args.batches))
                print(json.dumps({**records[-1], "curve": records[-1]["curve"][-1]}), flush=True)
        write_json(json_path, {"workload": vars(args), "runs": records})
        report_tradeoffs(records, json_path)
        return
    small = os.path.join(tempfile.mkdtemp(prefix="proxy_small_"), "reward_model_small")
    proxies = {"sft_large (1.1M, built-in)": builtin_path("builtin:reward_model"), "sft (0.1M)": small}
    accuracies = {"sft (0.1M)": train_small_proxy(small)}
    accuracies["sft_large (1.1M, built-in)"] = proxy_pair_accuracy(proxies["sft_large (1.1M, built-in)"])
    print(json.dumps(accuracies), flush=True)
    for seed in args.seeds:
        for n in args.ns:
            for proxy, path in proxies.items():
                records.append(run_proxy_scale(proxy, path, n, seed, args.updates))
                print(json.dumps(records[-1]), flush=True)
    write_json(json_path, {"workload": vars(args), "proxy_pair_accuracy": accuracies, "runs": records})
    report_proxy_scale(records, dict(sorted(accuracies.items())), json_path)


if __name__ == "__main__":
    main()
