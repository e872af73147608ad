"""Does asynchronous online DPO reach the synchronous result sooner? Learning curves against wall-clock time.

    python bench/sync_vs_async.py                     # -> docs/results/sync_vs_async.{json,md,png}
    python bench/sync_vs_async.py --quick --json /tmp/sva.json

The paper's headline (Noukhovitch et al. 2025, Sec. 5): asynchronous online DPO
matches the synchronous run's final performance in less time. Here both runs go
through the same machinery, the ``async_rlhf`` strategy with a generator process
on one core and the trainer on the other, from ``configs/builtin/async_online_dpo.yaml``;
only ``max_staleness`` differs (0: the trainer waits for each batch; 1: the next
batch is sampled while this one is trained on). The workload is the one of
``bench/async_speedup.py`` for the backend, so generation and training take
comparable time.

During training a callback keeps a copy of the policy every ``--eval_every``
generated batches together with the wall time since the first step (its own
copying excluded); after training each copy is evaluated (gold win rate and KL on
held-out prompts), so evaluation never competes with training for the clock.

Reported: per seed and mode, the curve; the synchronous runs' final win rate
(mean over seeds) as the target; and for each mode the wall time at which its
mean curve first reaches the target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from common import RESULTS, mean_std, pyplot, run_worker, write_json, write_markdown

# generation and training take comparable time per step (bench/async_speedup.py's WORKLOADS)
WORKLOADS = {"transformers": {"k": 8, "num_epochs": 1}, "vllm": {"k": 4, "num_epochs": 3}}


def run_once(
    backend: str, max_staleness: int, seed: int, batches: int, eval_every: int, batch_size: int, eval_prompts: int
) -> dict:
    """One training run in this process; returns its curve (evaluated after training)."""
    from lightning.pytorch.callbacks import Callback

    from common import module_and_data, quiet_trainer
    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.callbacks.evaluation import GoldEvaluation, evaluate_policy
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig
    from lightning_rlhf.tasks.copy import CopyGoldReward

    workload = WORKLOADS[backend]
    overrides = [
        "--seed_everything",
        str(seed),
        "--model.init_args.k",
        str(workload["k"]),
        "--model.init_args.num_epochs",
        str(workload["num_epochs"]),
        "--data.init_args.batch_size",
        str(batch_size),
    ]
    module, data = module_and_data("configs/builtin/async_online_dpo.yaml", overrides)

    class Snapshots(Callback):
        """The policy every ``eval_every`` versions, stamped with training wall time (this callback's time left out)."""

        def __init__(self) -> None:
            self.items: list[tuple[int, float, dict]] = []
            self.start = self.overhead = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.items.append((0, 0.0, {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}))
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            version = pl_module.policy_version
            if version and version % eval_every == 0 and version != self.items[-1][0]:
                now = time.perf_counter()
                self.items.append(
                    (
                        version,
                        now - self.start - self.overhead,
                        {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()},
                    )
                )
                self.overhead += time.perf_counter() - now

    snapshots = Snapshots()
    strategy = AsyncRLHFStrategy(
        generation=GenerationConfig(
            backend=backend, max_staleness=max_staleness, sync_every=1, vllm_kwargs={"max_model_len": 64}
        )
    )
    trainer = quiet_trainer(
        max_steps=batches * workload["num_epochs"],
        accelerator="cpu",
        strategy=strategy,
        callbacks=[WeightSync(probe_every=0), snapshots],
    )
    trainer.fit(module, data)
    evaluation = GoldEvaluation(CopyGoldReward(), num_prompts=eval_prompts)
    curve = []
    for version, seconds, state in snapshots.items:
        module.policy.load_state_dict(state)
        metrics = evaluate_policy(
            module.policy,
            module.ref_policy,
            module.tokenizer,
            evaluation.gold,
            evaluation.rows,
            module.sampling,
            evaluation.seed,
        )
        curve.append(
            {
                "version": version,
                "seconds": seconds,
                "gold_win_rate": metrics["eval/gold_win_rate"],
                "kl": metrics["eval/kl"],
            }
        )
    return {
        "backend": backend,
        "max_staleness": max_staleness,
        "seed": seed,
        "k": workload["k"],
        "num_epochs": workload["num_epochs"],
        "curve": curve,
    }


def _subprocess_run(args: argparse.Namespace, backend: str, max_staleness: int, seed: int) -> dict:
    spec = {
        "backend": backend,
        "max_staleness": max_staleness,
        "seed": seed,
        "batches": args.batches,
        "eval_every": args.eval_every,
        "batch_size": args.batch_size,
        "eval_prompts": args.eval_prompts,
    }
    return run_worker(__file__, spec)


def mean_curve(runs: list[dict]) -> list[dict]:
    """Mean over seeds at each evaluated version (seconds and win rate averaged)."""
    versions = [p["version"] for p in runs[0]["curve"]]
    out = []
    for i, version in enumerate(versions):
        win, win_std = mean_std([r["curve"][i]["gold_win_rate"] for r in runs])
        seconds, _ = mean_std([r["curve"][i]["seconds"] for r in runs])
        kl, _ = mean_std([r["curve"][i]["kl"] for r in runs])
        out.append(
            {"version": version, "seconds": seconds, "gold_win_rate": win, "gold_win_rate_std": win_std, "kl": kl}
        )
    return out


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall time at which the curve first reaches ``target``, linearly interpolated between evaluations;
    None if never."""
    for before, after in zip(curve, curve[1:]):
        if after["gold_win_rate"] >= target:
            if before["gold_win_rate"] >= target:
                return before["seconds"]
            fraction = (target - before["gold_win_rate"]) / (after["gold_win_rate"] - before["gold_win_rate"])
            return before["seconds"] + fraction * (after["seconds"] - before["seconds"])
    return None


def summarize(runs: list[dict]) -> dict:
    modes = {
        "sync": [r for r in runs if r["max_staleness"] == 0],
        "async": [r for r in runs if r["max_staleness"] == 1],
    }
    curves = {mode: mean_curve(rs) for mode, rs in modes.items()}
    target = curves["sync"][-1]["gold_win_rate"]
    summary = {
        "target_gold_win_rate": target,
        "sft_gold_win_rate": curves["sync"][0]["gold_win_rate"],
        "mean_curves": curves,
    }
    # a curve of 256 evaluation prompts moves by about its seeds' spread: also report reaching the
    # target less one standard error of the synchronous final (over seeds)
    _, final_std = mean_std([r["curve"][-1]["gold_win_rate"] for r in modes["sync"]])
    summary["target_standard_error"] = final_std / len(modes["sync"]) ** 0.5
    for mode, curve in curves.items():
        summary[f"{mode}_final_gold_win_rate"] = curve[-1]["gold_win_rate"]
        summary[f"{mode}_final_kl"] = curve[-1]["kl"]
        summary[f"{mode}_total_seconds"] = curve[-1]["seconds"]
        summary[f"{mode}_seconds_to_target"] = time_to_reach(curve, target)
        summary[f"{mode}_seconds_to_target_less_se"] = time_to_reach(curve, target - summary["target_standard_error"])
        # the seeds' spread: when each seed's own curve first reaches the same target
        summary[f"{mode}_seconds_to_target_per_seed"] = [time_to_reach(r["curve"], target) for r in modes[mode]]
    if summary["async_seconds_to_target"]:
        summary["speedup_to_target"] = summary["sync_seconds_to_target"] / summary["async_seconds_to_target"]
    summary["speedup_total_time"] = summary["sync_total_seconds"] / summary["async_total_seconds"]
    return summary


def report(payload: dict, json_path: str) -> None:
    s = payload["summary"]
    fmt = lambda x, spec: "never" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "| mode | final gold win rate | final KL | total train seconds | seconds to reach sync's final win rate "
        "| ... less one standard error | each seed's curve reaches it at (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("sync", "async"):
        per_seed = ", ".join(fmt(x, ".1f") for x in s.get(mode + "_seconds_to_target_per_seed", []))
        lines.append(
            f"| {mode} | {s[mode + '_final_gold_win_rate']:.3f} | {s[mode + '_final_kl']:.2f} "
            f"| {s[mode + '_total_seconds']:.1f} | {fmt(s[mode + '_seconds_to_target'], '.1f')} "
            f"| {fmt(s[mode + '_seconds_to_target_less_se'], '.1f')} | {per_seed} |"
        )
    lines.append(
        f"\nTarget (sync final, mean of {len(payload['runs']) // 2} seeds): {s['target_gold_win_rate']:.3f} "
        f"(standard error {s['target_standard_error']:.3f}); "
        f"SFT: {s['sft_gold_win_rate']:.3f}. "
        f"Speed-up to target: {fmt(s.get('speedup_to_target'), '.2f')}{'x' if s.get('speedup_to_target') else ''}; "
        f"total time ratio: {s['speedup_total_time']:.2f}x. Backend: {payload['backend']}."
    )
    write_markdown(os.path.splitext(json_path)[0] + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode, color in (("sync", "tab:blue"), ("async", "tab:orange")):
        for r in payload["runs"]:
            if (r["max_staleness"] == 0) == (mode == "sync"):
                ax.plot(
                    [p["seconds"] for p in r["curve"]],
                    [p["gold_win_rate"] for p in r["curve"]],
                    color=color,
                    alpha=0.25,
                    lw=0.8,
                )
        curve = s["mean_curves"][mode]
        ax.plot(
            [p["seconds"] for p in curve],
            [p["gold_win_rate"] for p in curve],
            color=color,
            lw=2,
            marker="o",
            ms=3,
            label=f"{mode} (mean)",
        )
    ax.axhline(s["target_gold_win_rate"], color="grey", ls="--", lw=0.8, label="sync final")
    ax.axhspan(
        s["target_gold_win_rate"] - s["target_standard_error"],
        s["target_gold_win_rate"],
        color="grey",
        alpha=0.15,
        lw=0,
    )
    ax.set_xlabel("training wall-clock seconds")
    ax.set_ylabel("gold win rate")
    ax.set_title(f"online DPO, {payload['backend']} generator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.splitext(json_path)[0] + ".png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "sync_vs_async.json"))
    parser.add_argument("--quick", action="store_true", help="one seed, a few batches (a smoke test, not a result)")
    parser.add_argument(
        "--backend", default=None, choices=sorted(WORKLOADS), help="default: vllm when installed, else transformers"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=48, help="generated batches per run")
    parser.add_argument("--eval_every", type=int, default=4, help="keep the policy every this many batches")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--eval_prompts", type=int, default=256)
    parser.add_argument(
        "--report_only", action="store_true", help="recompute the summary, table and plot from --json without training"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once
    if args.worker:
        print(json.dumps(run_once(**json.loads(args.worker))))
        return
    if args.report_only:
        return _rewrite(args.json)
    if args.quick:
        args.seeds, args.batches, args.eval_every, args.batch_size, args.eval_prompts = [0], 4, 2, 8, 32
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    runs = []
    for seed in args.seeds:
        for max_staleness in (0, 1):  # interleaved, so slow drift of the machine hits both modes alike
            runs.append(_subprocess_run(args, backend, max_staleness, seed))
            print(
                json.dumps({k: v for k, v in runs[-1].items() if k != "curve"} | {"final": runs[-1]["curve"][-1]}),
                flush=True,
            )
    payload = {
        "backend": backend,
        "workload": {
            **WORKLOADS[backend],
            "batches": args.batches,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "eval_prompts": args.eval_prompts,
            "quick": args.quick,
        },
        "runs": runs,
        "summary": summarize(runs),
    }
    write_json(args.json, payload)
    report(payload, args.json)


def _rewrite(json_path: str) -> None:
    """Recompute the summary and report of an existing results file (no training)."""
    payload = json.load(open(json_path))
    payload["summary"] = summarize(payload["runs"])
    write_json(json_path, payload)
    report(payload, json_path)


if __name__ == "__main__":
    main()
