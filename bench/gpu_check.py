"""The asynchronous engine on a CUDA machine: what CPU-only CI cannot run.

    python bench/gpu_check.py --out gpu_check.json

1. Built-in task, online DPO through ``async_rlhf`` with the trainer and a
   transformers generator process both on ``cuda:0`` (``generator_devices``),
   synchronously (``max_staleness=0``) and asynchronously (1): steps, staleness,
   the logprob difference after every refresh, refresh seconds, step time, and
   whether the parameters moved.
2. A model of SmolLM2-135M's shape (its ``LlamaConfig``, random weights: the
   real checkpoint is not on that machine) in a transformers generator process
   on ``cuda:0``, refreshed in packed buckets over gloo in bfloat16 and over
   CUDA IPC in bfloat16 and float32: refresh seconds, what held the trainer,
   the logprob difference before and after a refresh (against the trainer's
   weights in the generator's dtype: CUDA IPC should be exact), sampling throughput.
3. NCCL between two processes on one GPU: our layout check refuses it before
   starting; raw NCCL is run anyway to record how it fails and how fast, with
   ``torch.cuda.nccl.version()``.

vLLM is not needed (the GPU machine we can expect has none).

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

from common import SMOLLM2_135M_SHAPE


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
            import shutil
            import subprocess

            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
            apps = subprocess.run(query, capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else ""
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

    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

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
        device=device,
        generation=GenerationConfig(
            backend="transformers", generator_devices=[device], max_staleness=max_staleness, sync_every=1
        ),
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


def smollm2_shape(workdir: str, device: str, transport: str, dtype: str, num_prompts: int = 64) -> dict:
    """A SmolLM2-135M-shaped model in a transformers generator on ``device``: refreshes over ``transport``.

    The trainer keeps float32 master weights; the generator holds ``dtype``, and
    the trainer casts to it while packing. The probe compares the generator's
    logprobs with the trainer's model cast to the same dtype: over ``cuda_ipc``
    on one GPU both run the same kernels on the same bits, so they should agree exactly.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.generation import SamplingConfig
    from lightning_rlhf.generation.process import GeneratorProcess
    from lightning_rlhf.generation.transformers_backend import sequence_logprobs
    from lightning_rlhf.generation.weights import policy_state, stream_of
    from lightning_rlhf.generation.worker import GeneratorSpec
    from lightning_rlhf.models import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M_SHAPE, max_position_embeddings=2048, rope_theta=100000.0)
    folder = os.path.join(workdir, "smollm2-shape")
    if not os.path.exists(folder):
        LlamaForCausalLM(config).save_pretrained(folder)
        load_tokenizer(builtin_path("builtin:sft")).save_pretrained(folder)  # only eos and pad matter here
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    spec = GeneratorSpec(backend="transformers", model=folder, device=device, dtype=dtype, transport=transport)
    generator = GeneratorProcess(spec)
    start = time.perf_counter()
    generator.start()
    cast = getattr(torch, dtype)

    def weights():
        return stream_of(policy_state(model), cast)

    try:
        startup = time.perf_counter() - start
        generator.push_weights(weights(), version=0)
        prompt, completion = list(range(5, 37)), list(range(40, 72))

        def diff() -> float:
            twin = LlamaForCausalLM(config).to(device, cast).eval()  # the trainer's weights in the generator's dtype
            twin.load_state_dict({k: v.to(cast) for k, v in model.state_dict().items()})
            trainer_logprobs = sequence_logprobs(twin, prompt, completion)
            generator_logprobs = torch.tensor(generator.sequence_logprobs(prompt, completion, 1.0))
            return (trainer_logprobs.float().cpu() - generator_logprobs).abs().max().item()

        initial = diff()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * p.std() * torch.randn_like(p))
        stale = diff()
        refresh, held = [], []
        for version in (1, 2, 3):  # the whole refresh, and the part of it that holds the trainer up
            start = time.perf_counter()
            held.append(generator.push_weights(weights(), version=version))
            generator.wait_loaded()
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
        "transport": transport,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "generator_start_seconds": startup,
        "refresh_seconds": refresh,
        "refresh_held_seconds": held,
        "diff_initial": initial,
        "diff_stale": stale,
        "diff_after_refresh": after,
        "sample_tokens_per_s": tokens / seconds,
    }


def _nccl_rank(rank: int, port: int, out) -> None:
    from lightning_rlhf.generation.weights import join_group

    start = time.perf_counter()
    try:
        torch.cuda.set_device(0)
        group = join_group(port, "nccl-one-gpu", rank, 2, timeout_s=60, transport="nccl")
        group.broadcast(torch.ones(4, device="cuda:0"), 0).wait()
        torch.cuda.synchronize()
        out.put((rank, "no error", time.perf_counter() - start))
    except Exception as exc:
        out.put((rank, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", time.perf_counter() - start))


def nccl_on_one_gpu() -> dict:
    """NCCL between two processes on one GPU: our check refuses the layout; raw NCCL should fail fast."""
    import multiprocessing as mp

    from lightning_rlhf.errors import ConfigError
    from lightning_rlhf.generation.weights import host_store
    from lightning_rlhf.strategies.async_rlhf import check_transport

    try:
        check_transport("nccl", torch.device("cuda", 0), "cuda:0")
        refused = "not refused"
    except ConfigError as err:
        refused = str(err)
    store = host_store(timeout_s=60)
    context = mp.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_nccl_rank, args=(r, store.port, out)) for r in (0, 1)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        try:
            results.append(out.get(timeout=120))
        except Exception:
            results.append(("?", "no answer within 120 s (a hang)", 120.0))
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    return {
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
        "our_check": refused,
        "ranks": [{"rank": r, "outcome": o, "seconds": s} for r, o, s in results],
        "seconds": time.perf_counter() - start,
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
    workdir = tempfile.mkdtemp()
    parts = (
        ("sync", lambda: builtin_run(0, args.steps, args.device)),
        ("async", lambda: builtin_run(1, args.steps, args.device)),
        ("smollm2_gloo_bf16", lambda: smollm2_shape(workdir, args.device, "gloo", "bfloat16")),
        ("smollm2_cuda_ipc_bf16", lambda: smollm2_shape(workdir, args.device, "cuda_ipc", "bfloat16")),
        ("smollm2_cuda_ipc_fp32", lambda: smollm2_shape(workdir, args.device, "cuda_ipc", "float32")),
        ("nccl_on_one_gpu", nccl_on_one_gpu),
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
