"""How much staleness can each objective take? The paper's off-policy sweep, in miniature.

    python bench/offpolicy_sweep.py                   # full sweep -> docs/results/offpolicy_sweep.{json,md,png}
    python bench/offpolicy_sweep.py --quick --json /tmp/sweep.json

Noukhovitch et al. 2025, Sec. 3.1 (their Fig. 3): for online DPO, RLOO and PPO,
generate ``N`` mini-batches with one policy, then take ``N`` updates, one per
mini-batch (``N`` in 1, 2, 4, ..., 32; 1 is on-policy), with the same number of
updates for every ``N``. Each run starts from the built-in SFT policy with the
algorithm's recipe (``configs/builtin/<algo>.yaml``) changed to one update per
generated batch; staleness comes from :class:`~lightning_rlhf.callbacks.OffPolicySimulation`
(one process, a policy snapshot refreshed every ``N`` versions). At the end the
gold win rate and KL to the SFT policy are measured on held-out prompts.

Writes a JSON list of records (``algo``, ``n``, ``seed``, ``gold_win_rate``,
``kl``, ...), a markdown table of means over seeds, and two plots: gold win rate
against KL per algorithm, and the change in win rate from ``N = 1``. Records are
written after every run; ``--resume`` skips the ones already in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import RESULTS, mean_std, module_and_data, pyplot, quiet_trainer, write_json, write_markdown

ALGOS = ("online_dpo", "rloo", "ppo")
NS = (1, 2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)


def run_one(algo: str, n: int, seed: int, steps: int, eval_prompts: int) -> dict:
    """Train ``steps`` updates of ``algo`` with ``N = n`` and return its final gold evaluation."""
    from lightning_rlhf.callbacks import GoldEvaluation, OffPolicySimulation
    from lightning_rlhf.tasks.copy import CopyGoldReward

    overrides = [
        "--seed_everything",
        str(seed),
        "--model.init_args.num_epochs",
        "1",
        "--model.init_args.num_mini_batches",
        "1",
    ]
    module, data = module_and_data(f"configs/builtin/{algo}.yaml", overrides)
    evaluation = GoldEvaluation(CopyGoldReward(), num_prompts=eval_prompts)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[OffPolicySimulation(n), evaluation],
        default_root_dir=tempfile.mkdtemp(prefix="offpolicy_sweep_"),  # where GoldEvaluation leaves its summary
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    before, after = evaluation.history[0], evaluation.history[-1]
    return {
        "algo": algo,
        "n": n,
        "seed": seed,
        "updates": trainer.global_step,
        "gold_win_rate": after["eval/gold_win_rate"],
        "kl": after["eval/kl"],
        "gold_score": after["eval/gold_score"],
        "eos_rate": after["eval/eos_rate"],
        "sft_gold_win_rate": before["eval/gold_win_rate"],
        "seconds": time.perf_counter() - start,
    }


def summarize(records: list[dict]) -> dict[tuple[str, int], dict]:
    """Mean and standard deviation over seeds, per (algo, n), plus the change from that algo's N = 1."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["algo"], r["n"]), []).append(r)
    summary = {}
    for (algo, n), rs in sorted(groups.items(), key=lambda item: (ALGOS.index(item[0][0]), item[0][1])):
        win, win_std = mean_std([r["gold_win_rate"] for r in rs])
        kl, kl_std = mean_std([r["kl"] for r in rs])
        summary[(algo, n)] = {"win": win, "win_std": win_std, "kl": kl, "kl_std": kl_std, "seeds": len(rs)}
    for (algo, _), s in summary.items():
        base = summary.get((algo, 1))
        s["delta"] = s["win"] - base["win"] if base else float("nan")
    return summary


def report(records: list[dict], json_path: str) -> None:
    summary = summarize(records)
    stem = os.path.splitext(json_path)[0]
    lines = ["| algorithm | N | seeds | gold win rate | KL to SFT | change from N=1 |", "|---|---|---|---|---|---|"]
    for (algo, n), s in summary.items():
        lines.append(
            f"| {algo} | {n} | {s['seeds']} | {s['win']:.3f} ± {s['win_std']:.3f} | {s['kl']:.2f} ± {s['kl_std']:.2f} | {s['delta']:+.3f} |"
        )
    if records:
        lines.append(
            f"\nSFT policy: gold win rate {records[0]['sft_gold_win_rate']:.3f}. Mean ± standard deviation over seeds."
        )
    write_markdown(stem + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    algos = [a for a in ALGOS if any(k[0] == a for k in summary)]
    fig, axes = plt.subplots(1, len(algos), figsize=(4.2 * len(algos), 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    ns = sorted({n for _, n in summary})
    for ax, algo in zip(axes[0], algos):
        for i, n in enumerate(ns):
            points = [r for r in records if r["algo"] == algo and r["n"] == n]
            color = cmap(i / max(1, len(ns) - 1))
            ax.scatter([r["kl"] for r in points], [r["gold_win_rate"] for r in points], color=color, alpha=0.35, s=14)
            if (algo, n) in summary:
                s = summary[(algo, n)]
                ax.errorbar(
                    s["kl"],
                    s["win"],
                    xerr=s["kl_std"],
                    yerr=s["win_std"],
                    fmt="o",
                    color=color,
                    label=f"N={n}",
                    capsize=2,
                )
        ax.axhline(records[0]["sft_gold_win_rate"], color="grey", lw=0.8, ls="--")
        ax.set_title(algo)
        ax.set_xlabel("KL to SFT policy")
    axes[0][0].set_ylabel("gold win rate")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(stem + "_win_vs_kl.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for algo in algos:
        xs = [n for n in ns if (algo, n) in summary]
        ax.errorbar(
            xs,
            [summary[(algo, n)]["delta"] for n in xs],
            yerr=[summary[(algo, n)]["win_std"] for n in xs],
            marker="o",
            capsize=2,
            label=algo,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (mini-batches per policy; staleness up to N-1)")
    ax.set_ylabel("gold win rate change from N=1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "_delta.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "offpolicy_sweep.json"))
    parser.add_argument(
        "--quick", action="store_true", help="N in {1, 2}, one seed, a few updates (a smoke test, not a result)"
    )
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=128, help="updates per run, the same for every N")
    parser.add_argument("--eval_prompts", type=int, default=256)
    parser.add_argument(
        "--resume", action="store_true", help="keep the records already in --json and run only the missing ones"
    )
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once
    if args.quick:
        args.ns, args.seeds, args.steps, args.eval_prompts = [1, 2], [0], 4, 32

    records = json.load(open(args.json)) if args.resume and os.path.exists(args.json) else []
    done = {(r["algo"], r["n"], r["seed"]) for r in records}
    start = time.perf_counter()
    for algo in args.algos:
        for n in args.ns:
            for seed in args.seeds:
                if (algo, n, seed) in done:
                    continue
                records.append(run_one(algo, n, seed, args.steps, args.eval_prompts))
                print(json.dumps(records[-1]), flush=True)
                write_json(args.json, records)
    print(f"sweep took {time.perf_counter() - start:.0f} s for {len(args.algos) * len(args.ns) * len(args.seeds)} runs")
    report(records, args.json)


if __name__ == "__main__":
    main()
