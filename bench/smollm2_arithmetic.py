"""A real model learning on CPU: configs/smollm2/arithmetic.yaml (or another recipe), per seed from an empty cache.

    python bench/smollm2_arithmetic.py --seeds 0 1          # runs the recipe once per seed, one after the other
    python bench/smollm2_arithmetic.py --configs configs/smollm2/grpo.yaml --seeds 0 1   # GRPO instead
    python bench/smollm2_arithmetic.py --configs configs/smollm2/arithmetic.yaml configs/smollm2/lora.yaml
    python bench/smollm2_arithmetic.py --report              # re-renders from docs/results/smollm2_arithmetic.json
    python bench/smollm2_arithmetic.py --record 0 runs/x 1100 # adds a run made by hand with the same command

Each run is ``lightning-rlhf fit --config configs/smollm2/arithmetic.yaml --seed_everything S``
in a fresh process with an empty ``LIGHTNING_RLHF_CACHE``, so its wall time includes the
first-run preparation (dequantizing SmolLM2 and writing the datasets). From the run's CSV
log it keeps ``eval/accuracy`` (greedy, 256 held-out problems) and ``eval/format_rate``
(answers with a ``#### <number>`` at all) at every evaluation, and splits the gain:
the *format* part is what the accuracy would have gained if the new ``####`` answers were
right as often as the old ones, the *correctness* part the rest.

Writes ``docs/results/<name>.{json,md,png}``: ``smollm2_arithmetic`` for the default recipe, else
``smollm2_`` and the recipes' file names (``smollm2_grpo``, ``smollm2_arithmetic_lora``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, ROOT, pyplot, write_json, write_markdown  # noqa: E402

CONFIG = "configs/smollm2/arithmetic.yaml"


def curve(run_dir: str) -> list[dict]:
    """The evaluations of one run, in order: step, accuracy, format rate."""
    rows = list(csv.DictReader(open(glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv"))[-1])))
    return [
        {"step": int(r["step"]), "accuracy": float(r["eval/accuracy"]), "format_rate": float(r["eval/format_rate"])}
        for r in rows
        if r.get("eval/accuracy")
    ]


def run(configs: list[str], seed: int, workdir: str, timeout_s: float) -> dict:
    """Run the recipe once from an empty cache; its wall time and learning curve."""
    run_dir = os.path.join(workdir, f"seed{seed}")
    env = {**os.environ, "LIGHTNING_RLHF_CACHE": os.path.join(workdir, f"cache{seed}"), "HF_HUB_OFFLINE": "1"}
    command = ["lightning-rlhf", "fit", *[a for c in configs for a in ("--config", c)], "--seed_everything", str(seed)]
    start = time.perf_counter()
    out = subprocess.run(
        [*command, "--trainer.default_root_dir", run_dir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{out.stderr[-3000:]}")
    return {"seed": seed, "wall_seconds": seconds, "curve": curve(run_dir)}


def split_gain(before: dict, after: dict) -> dict:
    """Accuracy gain = format part (more answers with ####, right as often as before) + correctness part."""
    right_given_format = before["accuracy"] / before["format_rate"] if before["format_rate"] else 0.0
    format_part = (after["format_rate"] - before["format_rate"]) * right_given_format
    gain = after["accuracy"] - before["accuracy"]
    return {"gain": gain, "format_part": format_part, "correctness_part": gain - format_part}


def results_name(configs: list[str]) -> str:
    """``smollm2_arithmetic`` for the default recipe, else ``smollm2_`` and the recipes' file names."""
    return "smollm2_" + "_".join(os.path.splitext(os.path.basename(c))[0] for c in configs)


def report(payload: dict) -> None:
    configs = payload["configs"] if "configs" in payload else [payload["config"]]
    name = results_name(configs)
    lines = [
        "| seed | CPU kernels | wall time (min, preparation included) | eval/accuracy before -> after | gain "
        "| of which format | of which correctness | answers with #### before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["runs"]:
        first, last = r["curve"][0], r["curve"][-1]
        split = split_gain(first, last)
        lines.append(
            f"| {r['seed']} | {r.get('cpu_capability', 'not recorded')} | {r['wall_seconds'] / 60:.1f} "
            f"| {first['accuracy']:.3f} -> {last['accuracy']:.3f} | "
            f"{split['gain']:+.3f} | {split['format_part']:+.3f} | {split['correctness_part']:+.3f} | "
            f"{first['format_rate']:.3f} -> {last['format_rate']:.3f} |"
        )
    lines += ["", "Accuracy at each evaluation (step: accuracy per seed):", ""]
    steps = sorted({p["step"] for r in payload["runs"] for p in r["curve"]})
    lines += ["| step | " + " | ".join(f"seed {r['seed']}" for r in payload["runs"]) + " |"]
    lines += ["|---|" + "---|" * len(payload["runs"])]
    for step in steps:
        cells = [next((f"{p['accuracy']:.3f}" for p in r["curve"] if p["step"] == step), "") for r in payload["runs"]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    write_markdown(os.path.join(RESULTS, f"{name}.md"), lines)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in payload["runs"]:
            ax.plot(
                [p["step"] for p in r["curve"]],
                [p["accuracy"] for p in r["curve"]],
                marker="o",
                label=f"seed {r['seed']}",
            )
        ax.set_xlabel("optimizer updates (one per generated batch)")
        ax.set_ylabel("eval/accuracy (greedy, 256 held-out)")
        ax.set_title(f"SmolLM2-135M, {' + '.join(configs)}", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{name}.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[CONFIG], help="recipe, then overlays, as --config takes them")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--report", action="store_true", help="re-render the table and plot from the JSON")
    parser.add_argument("--record", nargs=3, metavar=("SEED", "RUN_DIR", "WALL_SECONDS"), help="add a run made by hand")
    parser.add_argument("--append", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--timeout_s", type=float, default=3600)
    args = parser.parse_args()
    path = os.path.join(RESULTS, f"{results_name(args.configs)}.json")
    if args.report:
        report(json.load(open(path)))
        return
    if args.record:
        seed, run_dir, seconds = args.record
        runs = [{"seed": int(seed), "wall_seconds": float(seconds), "curve": curve(run_dir)}]
    else:
        import torch

        with tempfile.TemporaryDirectory() as workdir:
            runs = [run(args.configs, seed, workdir, args.timeout_s) for seed in args.seeds]
        for r in runs:  # float results differ with the CPU's instruction set
            r["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    kept = json.load(open(path))["runs"] if (args.append or args.record) and os.path.exists(path) else []
    runs = sorted([r for r in kept if r["seed"] not in {n["seed"] for n in runs}] + runs, key=lambda r: r["seed"])
    payload = {"configs": args.configs, "machine": f"{os.cpu_count()} CPU cores", "runs": runs}
    write_json(path, payload)
    report(payload)


if __name__ == "__main__":
    main()
