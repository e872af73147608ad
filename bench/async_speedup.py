"""Synchronous vs asynchronous online DPO on this machine, per generation backend.

    python bench/async_speedup.py --json docs/results/async_speedup.json
    python bench/async_speedup.py --quick --json /tmp/speedup.json

For each backend the same workload runs twice through the same machinery (the
``async_rlhf`` strategy with the generator pinned to one core and the trainer to
the other): ``max_staleness=0`` (synchronous: the trainer waits for each batch)
and ``max_staleness=1`` (the paper's asynchronous setting). Each run is a fresh
subprocess; the first steps (start-up, compilation) are not timed.

Each backend's sync/async pair runs ``--repeats`` times, in turn, and the
medians are reported: this machine's run-to-run noise is about 20%. Per
backend: ``sync_episodes_per_s``, ``async_episodes_per_s``, ``speedup`` (their
ratio), ``gen_seconds`` and ``train_seconds`` (per step, from the synchronous
runs), ``sync_seconds`` (weight refresh per step, the time the trainer is held
up), ``ideal_speedup = (gen + train) / max(gen, train)``, and every repeat's
own speedup. An episode is one prompt-completion pair trained on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from statistics import median

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from common import StepClock, quiet_trainer

# Per backend, a workload where generation and training take comparable time on 2 CPU cores
# (measured: transformers samples about 5x faster than vLLM for this 0.1M-parameter model).
WORKLOADS = {"transformers": {"k": 8, "num_epochs": 1}, "vllm": {"k": 4, "num_epochs": 3}}


def run_once(
    backend: str,
    max_staleness: int,
    steps: int,
    warmup: int,
    batch_size: int,
    k: int,
    max_new_tokens: int,
    num_epochs: int,
) -> dict:
    """One training run in this process; returns its timings."""
    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

    L.seed_everything(0)
    module = OnlineDPO(
        policy="builtin:sft",
        reward=RewardModelScore("builtin:reward_model"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4),
        beta=0.5,
        k=k,
        max_new_tokens=max_new_tokens,
        num_epochs=num_epochs,
    )
    strategy = AsyncRLHFStrategy(
        generation=GenerationConfig(
            backend=backend, max_staleness=max_staleness, sync_every=1, vllm_kwargs={"max_model_len": 64}
        )
    )
    clock = StepClock()
    metrics: dict[str, list[float]] = {}

    class _Collect(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            for key in ("timing/rollout_seconds", "timing/train_seconds", "sync/seconds"):
                if key in trainer.callback_metrics and pl_module.policy_version > warmup:
                    metrics.setdefault(key, []).append(float(trainer.callback_metrics[key]))
            trainer.callback_metrics.clear()

    trainer = quiet_trainer(
        max_steps=(warmup + steps) * num_epochs,
        accelerator="cpu",
        strategy=strategy,
        callbacks=[WeightSync(probe_every=0), clock, _Collect()],
    )
    trainer.fit(module, PromptDataModule(batch_size=batch_size))
    start = clock.times[clock.versions.index(warmup)]
    elapsed = clock.times[-1] - start
    mean = lambda key: sum(metrics.get(key, [0.0])) / max(1, len(metrics.get(key, [])))  # noqa: E731
    return {
        "episodes_per_s": steps * batch_size * k / elapsed,
        "k": k,
        "num_epochs": num_epochs,
        "step_seconds": elapsed / steps,
        "rollout_wait_seconds": mean("timing/rollout_seconds"),
        "train_seconds": mean("timing/train_seconds"),
        "sync_seconds": mean("sync/seconds"),
    }


def _subprocess_run(args: argparse.Namespace, backend: str, max_staleness: int) -> dict:
    workload = WORKLOADS.get(backend, {"k": 4, "num_epochs": 1})
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        backend,
        str(max_staleness),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch_size",
        str(args.batch_size),
        "--k",
        str(args.k or workload["k"]),
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--num_epochs",
        str(args.num_epochs or workload["num_epochs"]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{backend} max_staleness={max_staleness} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="docs/results/async_speedup.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a measurement)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: transformers, and vllm when installed")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--k", type=int, default=None, help="samples per prompt (default: per backend, see WORKLOADS)")
    parser.add_argument(
        "--num_epochs", type=int, default=None, help="updates per generated batch (default: per backend)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=10)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="sync/async pairs per backend, run in turn; medians are reported (quick: 1)",
    )
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once

    if args.worker:
        backend, max_staleness = args.worker
        print(
            json.dumps(
                run_once(
                    backend,
                    int(max_staleness),
                    args.steps,
                    args.warmup,
                    args.batch_size,
                    args.k,
                    args.max_new_tokens,
                    args.num_epochs,
                )
            )
        )
        return
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.repeats = 3, 1, 8, 1
    backends = args.backends or ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    results = []
    for backend in backends:
        pairs = [
            (_subprocess_run(args, backend, 0), _subprocess_run(args, backend, 1)) for _ in range(args.repeats)
        ]  # interleaved: drift hits both
        sync = {key: median([s[key] for s, _ in pairs]) for key in pairs[0][0]}
        asynchronous = {key: median([a[key] for _, a in pairs]) for key in pairs[0][1]}
        gen, train = sync["rollout_wait_seconds"], sync["train_seconds"]
        results.append(
            {
                "backend": backend,
                "k": pairs[0][0]["k"],
                "num_epochs": pairs[0][0]["num_epochs"],
                "sync_episodes_per_s": sync["episodes_per_s"],
                "async_episodes_per_s": asynchronous["episodes_per_s"],
                "speedup": asynchronous["episodes_per_s"] / sync["episodes_per_s"],
                "gen_seconds": gen,
                "train_seconds": train,
                "sync_seconds": sync["sync_seconds"],
                "async_sync_seconds": asynchronous["sync_seconds"],
                "ideal_speedup": (gen + train) / max(gen, train),
                "sync_step_seconds": sync["step_seconds"],
                "async_step_seconds": asynchronous["step_seconds"],
                "speedup_per_repeat": [a["episodes_per_s"] / s["episodes_per_s"] for s, a in pairs],
                "runs": [{"sync": s, "async": a} for s, a in pairs],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    workload = {
        key: getattr(args, key) for key in ("steps", "warmup", "batch_size", "max_new_tokens", "repeats", "quick")
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"workload": workload, "cpu_cores": os.cpu_count(), "results": results}, f, indent=2)
    table = [
        "| backend | k | epochs | sync episodes/s | async episodes/s | speedup | per repeat | ideal "
        "| gen s/step | train s/step | refresh s/step (async) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        table.append(
            f"| {r['backend']} | {r['k']} | {r['num_epochs']} | {r['sync_episodes_per_s']:.1f} "
            f"| {r['async_episodes_per_s']:.1f} | {r['speedup']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['speedup_per_repeat'])} | {r['ideal_speedup']:.2f} | "
            f"{r['gen_seconds']:.3f} | {r['train_seconds']:.3f} | {r['async_sync_seconds']:.4f} |"
        )
    markdown = "\n".join(table)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
