"""How much staleness can each objective take? The paper's off-policy sweep, in miniature, made fair.

    python bench/offpolicy_sweep.py                   # grid, sweep, report -> docs/results/offpolicy_{grid,sweep}.*
    python bench/offpolicy_sweep.py --quick --json /tmp/sweep.json
    python bench/offpolicy_sweep.py --stage sweep --shard 0 2 --json a.json --threads 1 &   # one process per core
    python bench/offpolicy_sweep.py --stage sweep --shard 1 2 --json b.json --threads 1

Noukhovitch et al. 2025, Sec. 3.1 (their Fig. 3): for online DPO, RLOO and PPO,
generate ``N`` mini-batches with one policy, then take ``N`` updates, one per
mini-batch (``N = 1`` is on-policy), with the same number of updates for every ``N``.
Each run starts from an SFT policy with the algorithm's recipe (``configs/builtin/<algo>.yaml``)
changed to one update per generated batch and a learning rate decaying linearly to zero, as in
the paper; staleness comes from :class:`~lightning_rlhf.callbacks.OffPolicySimulation` (one
process, a policy snapshot refreshed every ``N`` versions). At the end the gold win rate and KL
to the SFT policy are measured on held-out prompts.

1. **Grid** (``--stage grid``): every algorithm gets the same grid at ``N = 1`` on the small
   policy: learning rates ``GRID_LRS`` x two strengths of its KL term (DPO's beta; RLOO's and PPO's
   kl_coef), two seeds; the cell with the best mean gold win rate is chosen.
2. **Sweep** (``--stage sweep``): ``N`` in 1..64 x 5 seeds x two policies (``builtin:sft``, 0.1M
   parameters, and ``builtin:sft_large``, 1.1M) x online DPO, RLOO, PPO, and RLOO and PPO with
   truncated importance sampling (``importance_sampling_cap`` 2), each with the grid's choice.
3. **Report** (``--stage report``): mean ± standard error per cell, the change from ``N = 1``,
   the least-squares slope of the gold win rate per doubling of ``N``, and two plots.

Records are written after every run, and a run already in the file is skipped, so an interrupted
stage continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

from common import RESULTS, mean_std, module_and_data, pyplot, quiet_trainer, write_json, write_markdown

ALGOS = ("online_dpo", "rloo", "ppo")
VARIANTS = ("online_dpo", "rloo", "ppo", "rloo+is", "ppo+is")  # "+is": truncated importance sampling on
COLORS = {"online_dpo": "C0", "rloo": "C1", "ppo": "C2", "rloo+is": "C1", "ppo+is": "C2"}  # +is: dashed, same hue
POLICIES = {"small": "builtin:sft", "large": "builtin:sft_large"}  # 0.1M and 1.1M parameters
NS = (1, 2, 4, 8, 16, 32, 64)
SEEDS = (0, 1, 2, 3, 4)
IS_CAP = 2.0  # TRL's first default for vllm_importance_sampling_cap (later versions use 3.0)
# The tuning grid, the same for every algorithm: learning rates x two strengths of the KL
# term (DPO's beta; RLOO's and PPO's kl_coef), each recipe's value and a weaker one.
GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3)  # 3e-3 added after every best was at 1e-3, the edge
GRID_STRENGTHS = {"online_dpo": (0.1, 0.5), "rloo": (0.01, 0.05), "ppo": (0.01, 0.05)}
STRENGTH_KEY = {"online_dpo": "beta", "rloo": "kl_coef", "ppo": "kl_coef"}


def run_one(
    variant: str,
    n: int,
    seed: int,
    steps: int,
    eval_prompts: int,
    policy: str = "small",
    lr: float | None = None,
    strength: float | None = None,
    reward_model: str | None = None,
) -> dict:
    """Train ``steps`` updates of ``variant`` with ``N = n`` and return its final gold evaluation.

    ``lr`` and ``strength`` (beta or kl_coef) replace the recipe's values when given, and
    ``reward_model`` (a folder) the proxy reward model.
    The learning rate decays linearly to zero over the ``steps`` updates, as in the paper.
    """
    from lightning_rlhf.callbacks import GoldEvaluation, OffPolicySimulation
    from lightning_rlhf.tasks.copy import CopyGoldReward

    algo, is_correction = variant.removesuffix("+is"), variant.endswith("+is")
    overrides = [
        "--seed_everything", str(seed),
        "--model.init_args.policy", POLICIES[policy],
        "--model.init_args.num_epochs", "1",
        "--model.init_args.num_mini_batches", "1",
        "--model.init_args.lr_schedule", "linear",
    ]  # fmt: skip
    if lr is not None:
        overrides += ["--model.init_args.optimizer.init_args.lr", str(lr)]
    if strength is not None:
        overrides += [f"--model.init_args.{STRENGTH_KEY[algo]}", str(strength)]
    if is_correction:
        overrides += ["--model.init_args.importance_sampling_cap", str(IS_CAP)]
    if reward_model is not None:
        overrides += ["--model.init_args.reward.init_args.model", reward_model]
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
        "is_correction": is_correction,
        "n": n,
        "seed": seed,
        "policy": POLICIES[policy],
        "policy_key": policy,
        "policy_params": sum(p.numel() for p in module.policy.parameters()),
        "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],  # before the decay
        STRENGTH_KEY[algo]: getattr(module, STRENGTH_KEY[algo]),
        "updates": trainer.global_step,
        "gold_win_rate": after["eval/gold_win_rate"],
        "kl": after["eval/kl"],
        "gold_score": after["eval/gold_score"],
        "eos_rate": after["eval/eos_rate"],
        "sft_gold_win_rate": before["eval/gold_win_rate"],
        "seconds": time.perf_counter() - start,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean, std = mean_std(values)
    return mean, std / math.sqrt(len(values))


def summarize(records: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Per (policy, variant, N): mean and standard error over seeds, and the change from that variant's N = 1."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["policy"], variant_of(r), r["n"]), []).append(r)
    summary = {}
    for key in sorted(groups, key=lambda k: (k[0], VARIANTS.index(k[1]), k[2])):
        rs = groups[key]
        win, win_se = mean_se([r["gold_win_rate"] for r in rs])
        kl, kl_se = mean_se([r["kl"] for r in rs])
        summary[key] = {"win": win, "win_se": win_se, "kl": kl, "kl_se": kl_se, "seeds": len(rs)}
    for (policy, variant, _), s in summary.items():
        base = summary.get((policy, variant, 1))
        s["delta"] = s["win"] - base["win"] if base else float("nan")
        s["delta_se"] = math.hypot(s["win_se"], base["win_se"]) if base else float("nan")
    return summary


def slope(records: list[dict]) -> tuple[float, float]:
    """Least-squares slope of the gold win rate against log2(N) over every run, and its standard error."""
    xs = [math.log2(r["n"]) for r in records]
    ys = [r["gold_win_rate"] for r in records]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return b, math.sqrt(residual / (len(xs) - 2) / sxx) if len(xs) > 2 else float("nan")


def report(records: list[dict], grid: list[dict], json_path: str) -> None:
    summary = summarize(records)
    stem = os.path.splitext(json_path)[0]
    policies = sorted({r["policy"] for r in records})
    params = {r["policy"]: r["policy_params"] for r in records}
    sft = {r["policy"]: r["sft_gold_win_rate"] for r in records}
    lines = [
        "| policy | variant | N | seeds | gold win rate | KL to SFT | change from N=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (policy, variant, n), s in summary.items():
        lines.append(
            f"| {policy} ({params[policy] / 1e6:.1f}M) | {variant} | {n} | {s['seeds']} "
            f"| {s['win']:.3f} ± {s['win_se']:.3f} | {s['kl']:.2f} ± {s['kl_se']:.2f} "
            f"| {s['delta']:+.3f} ± {s['delta_se']:.3f} |"
        )
    lines += ["", "Mean ± standard error over seeds; the change is from the same variant's N = 1.", ""]
    lines += ["Tuning grid (small policy, N = 1, mean gold win rate over the grid's seeds):", ""]
    lines += ["| algorithm | lr | beta / kl_coef | seeds | gold win rate | KL |", "|---|---|---|---|---|---|"]
    best = choose(grid)
    for (algo, lr, strength), rs in grid_cells(grid).items():
        mark = " **chosen**" if (best[algo]["lr"], best[algo]["strength"]) == (lr, strength) else ""
        win, win_se = mean_se([r["gold_win_rate"] for r in rs])
        kl = statistics.fmean(r["kl"] for r in rs)
        lines.append(f"| {algo} | {lr:g} | {strength:g} | {len(rs)} | {win:.3f} ± {win_se:.3f}{mark} | {kl:.2f} |")
    lines += ["", "Slope of the gold win rate per doubling of N (least squares over every run; ± standard error):", ""]
    lines += ["| policy | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for policy in policies:
        row = []
        for v in VARIANTS:
            rs = [r for r in records if r["policy"] == policy and variant_of(r) == v]
            row.append("{:+.4f} ± {:.4f}".format(*slope(rs)) if len({r["n"] for r in rs}) > 1 else "-")
        lines.append(f"| {policy} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"SFT start, {p}: gold win rate {sft[p]:.3f}." for p in policies]
    write_markdown(stem + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(policies), figsize=(5.2 * len(policies), 3.8), squeeze=False, sharey=True)
    for ax, policy in zip(axes[0], policies):
        for v in VARIANTS:
            xs = sorted(n for p, vv, n in summary if p == policy and vv == v)
            if not xs:
                continue
            ax.errorbar(
                xs,
                [summary[(policy, v, n)]["win"] for n in xs],
                yerr=[summary[(policy, v, n)]["win_se"] for n in xs],
                marker="o",
                capsize=2,
                ls="--" if v.endswith("+is") else "-",
                color=COLORS[v],
                label=v,
            )
        ax.axhline(sft[policy], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{policy} ({params[policy] / 1e6:.1f}M parameters)")
        ax.set_xlabel("N (mini-batches per policy; staleness up to N-1)")
    axes[0][0].set_ylabel("final gold win rate (± s.e.)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_by_n.png", dpi=120)
    fig, axes = plt.subplots(1, len(policies), figsize=(5.2 * len(policies), 3.8), squeeze=False, sharey=True)
    for ax, policy in zip(axes[0], policies):
        for v in VARIANTS:
            rs = [r for r in records if r["policy"] == policy and variant_of(r) == v]
            ax.scatter(
                [r["kl"] for r in rs],
                [r["gold_win_rate"] for r in rs],
                s=10,
                alpha=0.5,
                color=COLORS[v],
                marker="x" if v.endswith("+is") else "o",
                label=v,
            )
        ax.set_title(policy)
        ax.set_xlabel("KL to SFT policy")
    axes[0][0].set_ylabel("final gold win rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_win_vs_kl.png", dpi=120)


def variant_of(record: dict) -> str:
    return record["algo"] + ("+is" if record.get("is_correction") else "")


def grid_cells(grid: list[dict]) -> dict[tuple[str, float, float], list[dict]]:
    """The grid's runs by (algo, lr, strength), one list of seeds each."""
    cells: dict[tuple[str, float, float], list[dict]] = {}
    for r in grid:
        cells.setdefault((r["algo"], r["lr"], r[STRENGTH_KEY[r["algo"]]]), []).append(r)
    return cells


def choose(grid: list[dict]) -> dict[str, dict]:
    """Each algorithm's (lr, strength) with the highest mean gold win rate over the grid's seeds."""
    best: dict[str, dict] = {}
    for (algo, lr, strength), rs in grid_cells(grid).items():
        score = statistics.fmean(r["gold_win_rate"] for r in rs)
        if algo not in best or score > best[algo]["gold_win_rate"]:
            best[algo] = {"lr": lr, "strength": strength, "gold_win_rate": score}
    return best


def run_all(jobs: list[dict], path: str, steps: int, eval_prompts: int) -> list[dict]:
    """Run ``jobs`` (``run_one`` keyword arguments) not yet in ``path``, writing ``path`` after each."""
    records = json.load(open(path)) if os.path.exists(path) else []
    key = lambda d: (d["variant"], d["n"], d["seed"], d["policy"], d.get("lr"), d.get("strength"))  # noqa: E731
    done = {
        key({**r, "variant": variant_of(r), "policy": r["policy_key"], "strength": r[STRENGTH_KEY[r["algo"]]]})
        for r in records
    }
    for job in jobs:
        if key(job) in done:
            continue
        records.append(run_one(steps=steps, eval_prompts=eval_prompts, **job))
        print(json.dumps(records[-1]), flush=True)
        write_json(path, records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "offpolicy_sweep.json"))
    parser.add_argument(
        "--grid_json", default=None, help="the grid's records (default: offpolicy_grid.json beside --json)"
    )
    parser.add_argument(
        "--stage",
        choices=("all", "grid", "sweep", "report"),
        default="all",
        help="grid: tune each algorithm at N=1; sweep: every N with the grid's choice; report: tables and plots",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: one grid cell, N in {1, 2}, one seed, the small policy, 2 updates",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--grid_seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=64, help="updates per run, the same for every N")
    parser.add_argument("--eval_prompts", type=int, default=256)
    parser.add_argument(
        "--shard",
        nargs=2,
        type=int,
        default=(0, 1),
        metavar=("I", "K"),
        help="run every K-th job from the I-th (one process per core, each with its own --json)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    args.grid_json = args.grid_json or os.path.join(os.path.dirname(os.path.abspath(args.json)), "offpolicy_grid.json")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once
    lrs, strengths = GRID_LRS, GRID_STRENGTHS
    if args.quick:
        args.ns, args.seeds, args.grid_seeds, args.steps, args.eval_prompts = [1, 2], [0], [0], 2, 32
        args.policies, lrs, strengths = ["small"], GRID_LRS[:1], {a: v[:1] for a, v in GRID_STRENGTHS.items()}
    start = time.perf_counter()
    if args.stage in ("all", "grid"):
        jobs = [
            dict(variant=a, n=1, seed=seed, policy="small", lr=lr, strength=strength)
            for a in ALGOS
            for lr in lrs
            for strength in strengths[a]
            for seed in args.grid_seeds
        ]
        grid = run_all(jobs, args.grid_json, args.steps, args.eval_prompts)
        print(json.dumps(choose(grid), indent=1))
    if args.stage in ("all", "sweep"):
        best = choose(json.load(open(args.grid_json)))
        jobs = [
            dict(
                variant=v,
                n=n,
                seed=seed,
                policy=policy,
                lr=best[v.removesuffix("+is")]["lr"],
                strength=best[v.removesuffix("+is")]["strength"],
            )  # fmt: skip
            for seed in args.seeds  # seeds outermost: a sweep cut short still has every cell
            for policy in args.policies
            for v in args.variants
            for n in args.ns
        ]
        index, count = args.shard
        run_all(jobs[index::count], args.json, args.steps, args.eval_prompts)
    if args.stage in ("all", "report"):
        report(json.load(open(args.json)), json.load(open(args.grid_json)), args.json)
    print(f"{args.stage} took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
