"""A small training run used by the strategy tests (run in a subprocess: spawned generators need a __main__ guard).

python tests/strategies/run_training.py --out run.json --algo online_dpo --mode async --max_staleness 1 --steps 6
"""

import argparse
import atexit
import contextlib
import csv
import faulthandler
import glob
import json
import os
import signal
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.callbacks import WeightSync
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.generation import process
from lightning_rlhf.lora import LoRA
from lightning_rlhf.modules import GRPO, PPO, RLOO, OnlineDPO
from lightning_rlhf.rewards import RewardModelScore
from lightning_rlhf.strategies import (
    AsyncRLHFDDPStrategy,
    AsyncRLHFDeepSpeedStrategy,
    AsyncRLHFStrategy,
    GenerationConfig,
)

KILLS = {"generate": "generate", "weights": "receive_weights", "logprobs": "sequence_logprobs"}


def die_on_schedule(schedule: str, marks: str) -> None:
    """Make generators kill themselves at set points: ``"generate:3,weights:2"`` kills the first
    generator a second into its 3rd generate request (while the trainer waits for it), its
    replacement when its 2nd weight refresh arrives (while the trainer sends).

    Runs in the spawned generator process, which imports this script as ``__mp_main__`` (only in runs
    with ``--kill_generator``: the others' generators skip it). Each death
    leaves a file in ``marks``; a generator counts them at start to know which entry is its own.
    """
    from lightning_rlhf.generation import worker

    build = worker.GeneratorSpec.build

    def build_and_arm(spec):
        backend = build(spec)
        plan, deaths = schedule.split(","), len(os.listdir(marks))
        if deaths < len(plan):
            kind, at = plan[deaths].split(":")
            method = getattr(backend, KILLS[kind])
            calls = [0]

            def dying(*args, **kwargs):
                calls[0] += 1
                if calls[0] == int(at):
                    if kind == "generate":
                        time.sleep(1.0)  # part-way through generating: the trainer has trained on and now waits
                    open(os.path.join(marks, f"death{deaths}-{kind}"), "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                return method(*args, **kwargs)

            setattr(backend, KILLS[kind], dying)
        return backend

    worker.GeneratorSpec.build = build_and_arm


if __name__ == "__mp_main__" and os.environ.get("KILL_GENERATOR"):
    die_on_schedule(os.environ["KILL_GENERATOR"], os.environ["KILL_GENERATOR_MARKS"])


class Record(Callback):
    """The prompts of every batch trained on, in order; optionally fails at a version."""

    def __init__(self, fail_at_version):
        self.prompts, self.fail_at_version, self.version = [], fail_at_version, 0
        self.has_generator = None  # whether this rank ran a generator process
        self.generator_pids: list[int] = []  # its generator processes (several with num_generators)
        self.scored_by_generator: list[float] = []  # per batch trained on: the share of its scores that came with it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.has_generator is None:
            generator = getattr(trainer.strategy, "generator", None)
            self.has_generator = generator is not None
            self.generator_pids = getattr(generator, "pids", [getattr(generator, "pid", None)])
        if outputs:  # a batch was trained on: its rows and generations (None while the pipeline fills up)
            self.version = pl_module.policy_version
            self.prompts.append([r["prompt"] for r in outputs["rows"]])
            self.scored_by_generator.append(outputs["generations"].scored_share)
        if self.fail_at_version is not None and self.version >= self.fail_at_version:
            raise RuntimeError("failing on purpose")

    def on_exception(self, trainer, pl_module, exception):
        # the moment training stopped, before the strategy closes its generators (tests time it against a kill)
        print(f"training stopped at {time.time():.3f} by {type(exception).__name__}", file=sys.stderr, flush=True)


ALGOS = {
    "online_dpo": (OnlineDPO, dict(beta=0.5, k=4)),
    "rloo": (RLOO, dict(k=4)),
    "ppo": (PPO, dict(k=2, num_epochs=2, critic=None)),
    "grpo": (GRPO, dict(k=4)),
}


def zero_layout(trainer, module) -> dict | None:
    """What this rank holds under DeepSpeed ZeRO, against the whole policy: its shard of the
    parameters (stage 3), or of the fp32 master weights the optimizer keeps (stage 2)."""
    if not isinstance(trainer.strategy, AsyncRLHFDeepSpeedStrategy):
        return None
    params = list(module.policy.parameters())
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if all(hasattr(p, "ds_tensor") for p in params):
        return {
            "whole": whole,
            "params_held": sum(p.ds_tensor.numel() for p in params),
            "largest_param_fraction": max(p.ds_tensor.numel() / p.ds_numel for p in params),
        }
    master = trainer.strategy.deepspeed_engine.optimizer.single_partition_of_fp32_groups
    return {
        "whole": whole,
        "params_held": sum(p.numel() for p in params),
        "master_weights_held": sum(t.numel() for t in master),
    }


def count_deferred_reductions(deepspeed: bool) -> list[int]:
    """Count the backwards that skip the gradient reduction: DDP's ``no_sync``, DeepSpeed's non-boundary ones."""
    from torch.nn.parallel import DistributedDataParallel

    count = [0]
    no_sync = DistributedDataParallel.no_sync

    def counted_no_sync(self):
        count[0] += 1
        return no_sync(self)

    DistributedDataParallel.no_sync = counted_no_sync
    if not deepspeed:
        return count
    from deepspeed.runtime.engine import DeepSpeedEngine

    set_boundary = DeepSpeedEngine.set_gradient_accumulation_boundary

    def counted_set_boundary(self, is_boundary):
        count[0] += not is_boundary
        return set_boundary(self, is_boundary)

    DeepSpeedEngine.set_gradient_accumulation_boundary = counted_set_boundary
    return count


def record_groups_left_at_exit(log_dir: str) -> None:
    """Rank 0, at exit after the strategy's handlers: whether a process group was left to interpreter shutdown."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        with open(os.path.join(log_dir, "groups_left_at_exit.json"), "w") as f:
            json.dump(torch.distributed.is_initialized(), f)


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that sees a hang asks for the stacks
    # Ctrl-C must raise KeyboardInterrupt even when the test suite itself was started in the background
    # (a non-interactive shell's `cmd &` ignores SIGINT, the children inherit that, and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--algo", default="online_dpo", choices=ALGOS)
    parser.add_argument("--mode", default="async", choices=["sync", "async", "ddp", "deepspeed2", "deepspeed3"])
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--policy", default="builtin:sft")
    parser.add_argument("--max_staleness", type=int, default=1)
    parser.add_argument("--sync_every", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--probe_every", type=int, default=1)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--save_ckpt", default=None)
    parser.add_argument("--vllm_kwargs", default="{}")
    parser.add_argument("--restart_on_failure", action="store_true")
    parser.add_argument(
        "--shared_generator", action="store_true", help="ddp/deepspeed: one generator on rank 0 for every rank"
    )
    parser.add_argument("--num_generators", type=int, default=1, help="generator processes per rank")
    parser.add_argument(
        "--score_on_generator",
        type=lambda value: value if value == "auto" else float(value),
        nargs="?",
        const=1.0,
        default=0.0,
        help="the generator scores its samples (or this fraction of each batch's prompts, or 'auto')",
    )
    parser.add_argument("--micro_batch_size", type=int, default=None, help="sequences per forward and backward")
    parser.add_argument("--lora", type=int, default=None, help="train a LoRA adapter of this rank")
    parser.add_argument("--lora_refresh", default="adapter", help="what a LoRA refresh sends: adapter or merged")
    parser.add_argument("--slow_update_s", type=float, default=0.0, help="each update takes this much longer")
    parser.add_argument("--dataset", default="builtin:prompts")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--fail_at_version", type=int, default=None, help="raise inside training at this version")
    parser.add_argument(
        "--kill_generator",
        default=None,
        help='generators kill themselves on this schedule, e.g. "generate:3,weights:2" (see die_on_schedule)',
    )
    args = parser.parse_args()
    if args.kill_generator:  # read by the spawned generators, which inherit the environment
        # the generators arm the schedule when they import this script: keep spawn's re-run of __main__
        process.main_not_rerun_unless_needed = lambda payload: contextlib.nullcontext()
        os.environ["KILL_GENERATOR"] = args.kill_generator
        os.environ["KILL_GENERATOR_MARKS"] = os.path.join(os.path.dirname(os.path.abspath(args.out)), "deaths")
        os.makedirs(os.environ["KILL_GENERATOR_MARKS"], exist_ok=True)

    # registered before fit, so it runs after the handlers the strategy registers (atexit runs them in reverse)
    atexit.register(record_groups_left_at_exit, os.path.dirname(os.path.abspath(args.out)))
    L.seed_everything(0)
    cls, kwargs = ALGOS[args.algo]
    module = cls(
        policy=args.policy,
        reward=RewardModelScore("builtin:reward_model"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4),
        temperature=0.7,
        max_new_tokens=10,
        micro_batch_size=args.micro_batch_size,
        **({"lora": LoRA(rank=args.lora, alpha=2.0 * args.lora, refresh=args.lora_refresh)} if args.lora else {}),
        **kwargs,
    )
    deferred = count_deferred_reductions(deepspeed=args.mode.startswith("deepspeed"))
    if args.slow_update_s:  # a slow trainer: a generator dying meanwhile is found at the refresh that follows
        learn = module.learn
        module.learn = lambda *a: (time.sleep(args.slow_update_s), learn(*a))[1]
    strategy_kwargs = dict(
        backend=args.backend,
        max_staleness=args.max_staleness,
        sync_every=args.sync_every,
        vllm_kwargs=json.loads(args.vllm_kwargs),
        restart_on_failure=args.restart_on_failure,
        num_generators=args.num_generators,
        score_on_generator=args.score_on_generator,
    )
    if args.mode == "sync":
        strategy, devices = "auto", 1
    elif args.mode == "async":
        strategy, devices = AsyncRLHFStrategy(generation=GenerationConfig(**strategy_kwargs)), 1
    elif args.mode == "ddp":
        strategy, devices = (
            AsyncRLHFDDPStrategy(
                generation=GenerationConfig(shared_generator=args.shared_generator, **strategy_kwargs)
            ),
            2,
        )
    else:
        strategy, devices = (
            AsyncRLHFDeepSpeedStrategy(
                stage=int(args.mode[-1]),
                generation=GenerationConfig(shared_generator=args.shared_generator, **strategy_kwargs),
            ),
            2,
        )
    log_dir = os.path.dirname(os.path.abspath(args.out))
    trainer = L.Trainer(
        max_steps=args.steps * getattr(module, "num_epochs", 1),
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=CSVLogger(log_dir, name="logs"),
        log_every_n_steps=1,
        callbacks=[WeightSync(probe_every=args.probe_every), record := Record(args.fail_at_version)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = PromptDataModule(args.dataset, batch_size=args.batch_size, shuffle=args.shuffle)
    trainer.fit(module, data, ckpt_path=args.ckpt_path)
    if args.save_ckpt:
        trainer.save_checkpoint(args.save_ckpt)
    mine = (record.prompts, record.has_generator, zero_layout(trainer, module), deferred[0])
    per_rank = [mine]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
        per_rank = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_rank, mine)
    prompts_per_rank = [prompts for prompts, *_ in per_rank]
    if trainer.global_rank == 0:
        rows = list(csv.DictReader(open(glob.glob(os.path.join(log_dir, "logs", "version_*", "metrics.csv"))[-1])))
        series = {
            key: [float(r[key]) for r in rows if r.get(key)]
            for key in set().union(*(r.keys() for r in rows))
            if key != "epoch"
        }
        params = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
        source = module.rollout_source  # a PipelinedSource or SharedSource under the asynchronous strategies
        extra = (
            {"restarts": source.restarts, "forced_refreshes": source.forced_refreshes} if args.mode != "sync" else {}
        )
        json.dump(
            {
                "metrics": series,
                "policy_version": module.policy_version,
                "param_norm": params.norm().item(),
                # a LoRA policy's B matrices start at 0: their norm is what the adapter has learnt
                "lora_b_norm": sum(p.norm().item() for n, p in module.policy.named_parameters() if ".lora_B." in n),
                "pid": os.getpid(),
                "trained_prompts": record.prompts,
                "scored_by_generator": record.scored_by_generator,
                "trained_prompts_per_rank": prompts_per_rank,
                "generators": sum(bool(has) for _, has, *_ in per_rank),
                "generator_per_rank": [bool(has) for _, has, *_ in per_rank],
                "generator_pids": record.generator_pids,
                "zero_per_rank": [zero for _, _, zero, _ in per_rank],
                "deferred_reductions_per_rank": [count for *_, count in per_rank],
                "deaths": sorted(os.listdir(os.environ["KILL_GENERATOR_MARKS"])) if args.kill_generator else [],
                **extra,
            },
            open(args.out, "w"),
        )


if __name__ == "__main__":
    main()
