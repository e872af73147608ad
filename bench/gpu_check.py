"""The asynchronous engine on a CUDA machine: what CPU-only CI cannot run.

    python bench/gpu_check.py --out gpu_check.json

1. Built-in task, online DPO through ``async_rlhf`` with the trainer and a
   transformers generator process both on ``cuda:0`` (``generator_devices``),
   synchronously (``max_staleness=0``) and asynchronously (1): steps, staleness,
   the logprob difference after every refresh, refresh seconds, step time, and
   whether the parameters moved.
2. A model of SmolLM2-135M's shape (its ``LlamaConfig``, random weights: the
   real checkpoint is not on that machine) in a generator process on
   ``cuda:0``: refresh seconds and the logprob difference before and after a
   refresh, and sampling throughput.

Needs the built-in artifacts (``$LIGHTNING_RLHF_CACHE``) prepared beforehand.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class _Record(Callback):
    """Per-step metrics and wall times of the policy updates."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("sync/", "rollout/staleness", "timing/", "train/loss"))
        }
        row.update(version=pl_module.policy_version, time=time.perf_counter())
        if len(self.rows) == 5:  # where the two processes really run, read while training
            import subprocess

            apps = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout
            row.update(
                policy_device=str(next(pl_module.policy.parameters()).device),
                generator_pid=trainer.strategy.generator.pid,
                trainer_pid=os.getpid(),
                gpu_processes=apps.strip(),
            )
        self.rows.append(row)
        trainer.callback_metrics.clear()


def builtin_run(max_staleness: int, steps: int, device: str) -> dict:
    from torch.utils.data import DataLoader

    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.models import builtin_path
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.strategies import AsyncRLHFStrategy

    L.seed_everything(0)
    rows = [json.loads(line) for line in open(builtin_path("builtin:prompts"))]
    loader = DataLoader(rows, batch_size=64, shuffle=True, collate_fn=list)
    module = OnlineDPO(
        policy="builtin:sft",
        reward=RewardModelScore("builtin:reward_model"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4),
        beta=0.5,
        k=4,
        max_new_tokens=10,
    )
    strategy = AsyncRLHFStrategy(
        backend="transformers", device=device, generator_devices=[device], max_staleness=max_staleness, sync_every=1
    )
    record = _Record()
    trainer = L.Trainer(
        accelerator=device.split(":")[0],
        strategy=strategy,
        max_steps=steps,
        callbacks=[WeightSync(probe_every=1), record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    module.configure_model()
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer.fit(module, train_dataloaders=loader)
    moved = max((p.detach().cpu() - b.cpu()).abs().max().item() for p, b in zip(module.policy.parameters(), before))
    timed = [r for r in record.rows if r["version"] > 3]
    diffs = [r["sync/logprob_max_diff"] for r in record.rows if "sync/logprob_max_diff" in r]
    return {
        "max_staleness": max_staleness,
        "steps": trainer.global_step,
        **{k: record.rows[5][k] for k in ("policy_device", "generator_pid", "trainer_pid", "gpu_processes")},
        "staleness": [int(r["rollout/staleness"]) for r in record.rows if "rollout/staleness" in r],
        "logprob_max_diff_max": max(diffs) if diffs else None,
        "refreshes_probed": len(diffs),
        "sync_seconds_mean": sum(r.get("sync/seconds", 0.0) for r in timed) / max(1, len(timed)),
        "step_seconds": (timed[-1]["time"] - timed[0]["time"]) / max(1, len(timed) - 1),
        "max_param_change": moved,
    }


def smollm2_shape(workdir: str, device: str, num_prompts: int = 64) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlhf.generation import SamplingConfig
    from lightning_rlhf.generation.process import GeneratorProcess, GeneratorSpec
    from lightning_rlhf.generation.transformers_backend import sequence_logprobs
    from lightning_rlhf.generation.weights import policy_state
    from lightning_rlhf.models import builtin_path, load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    folder = os.path.join(workdir, "smollm2-shape")
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    load_tokenizer(builtin_path("builtin:sft")).save_pretrained(
        folder
    )  # ids fit in the vocabulary; only eos and pad matter here
    model = model.to(device).eval()
    generator = GeneratorProcess(GeneratorSpec(backend="transformers", model=folder, device=device))
    start = time.perf_counter()
    generator.start()
    try:
        startup = time.perf_counter() - start
        generator.push_weights(policy_state(model), version=0)
        prompt, completion = list(range(5, 37)), list(range(40, 72))

        def diff() -> float:
            trainer_logprobs = sequence_logprobs(model, prompt, completion)
            return (
                (trainer_logprobs - torch.tensor(generator.sequence_logprobs(prompt, completion, 1.0)))
                .abs()
                .max()
                .item()
            )

        initial = diff()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * p.std() * torch.randn_like(p))
        stale = diff()
        refresh, held = [], []
        for version in (1, 2, 3):  # the whole transfer, and the part of it that holds the trainer up
            start = time.perf_counter()
            held.append(generator.push_weights(policy_state(model), version=version))
            generator.finish_transfer()
            refresh.append(time.perf_counter() - start)
        after = diff()
        sampling = SamplingConfig(k=4, temperature=1.0, max_new_tokens=64)
        prompts = [list(range(5 + i, 37 + i)) for i in range(num_prompts)]
        generator.submit(0, prompts, sampling)
        generator.result(0)  # warm-up
        start = time.perf_counter()
        generator.submit(1, prompts, sampling)
        out = generator.result(1)
        seconds = time.perf_counter() - start
        tokens = sum(len(c) for c in out.completion_ids)
    finally:
        generator.close()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "generator_start_seconds": startup,
        "refresh_seconds": refresh,
        "refresh_held_seconds": held,
        "diff_initial": initial,
        "diff_stale": stale,
        "diff_after_refresh": after,
        "sample_tokens_per_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda:0", help="cpu only to try the script itself")
    args = parser.parse_args()
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device (or --device cpu to try the script).")
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    parts = (
        ("sync", lambda: builtin_run(0, args.steps, args.device)),
        ("async", lambda: builtin_run(1, args.steps, args.device)),
        ("smollm2_shape", lambda: smollm2_shape(tempfile.mkdtemp(), args.device)),
    )
    for name, fn in parts:
        try:
            result[name] = fn()
        except Exception as exc:  # keep what the other parts measured
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(name, json.dumps(result[name]), flush=True)
        json.dump(result, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
