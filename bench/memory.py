"""Peak memory of one RL update as the batch grows, in micro-batches and with gradient checkpointing.

    python bench/memory.py                     # SmolLM2-135M on CPU -> docs/results/memory.{json,md}
    python bench/memory.py --sequences 16 --micro 8 --json /tmp/m.json   # a smoke test

Each row is one RLOO update (k = 2, one mini-batch) of SmolLM2-135M-Instruct (``builtin:smollm2``)
in a fresh process, on rollouts of a fixed shape: a stand-in source returns ``--prompt_tokens``
prompt tokens and ``--response_tokens`` response tokens per sequence (no stop token), scored 0 or
1 by parity, so that every row does the same work per sequence. The update runs the no-gradient
forwards (old policy, reference) and the policy's forward and backward, all in micro-batches of
``micro_batch_size`` sequences. ``peak_bytes`` is the process's peak resident memory
(``ru_maxrss``); ``resident_before_bytes`` what it held when training started (the policy, the
reference, the tokenizer: what any batch size needs), so the difference is what the update added
(activations, logits, gradients and AdamW's state, which appears at the first step). At a fixed
micro-batch the difference should stay flat as the batch grows (issue 30: within 25 % over 4x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, write_json, write_markdown  # noqa: E402

FIELDS = (
    "device",
    "model",
    "params",
    "batch_sequences",
    "micro_batch_size",
    "gradient_checkpointing",
    "tokens_per_sequence",
    "peak_bytes",
    "resident_before_bytes",
    "step_seconds",
)


def one_row(sequences: int, micro: int | None, checkpointing: bool, prompt_tokens: int, response_tokens: int) -> dict:
    """Run one update in this process and return its row (called in a fresh child by :func:`measure`)."""
    import lightning as L
    import psutil
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.generation import Generations
    from lightning_rlhf.modules import RLOO
    from lightning_rlhf.rewards import RewardFunction
    from lightning_rlhf.tasks import prepare

    prepare("smollm2")

    class Parity(RewardFunction):
        def __call__(self, prompts, completions, rows=None):
            return torch.tensor([float(i % 2) for i in range(len(completions))])

    class FixedShape:
        """Rollouts of ``prompt_tokens`` + ``response_tokens`` seeded random tokens, none ending with a stop."""

        def next_rollouts(self, rows, prompt_ids, sampling, version):
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(100, 20000, (prompt_tokens,), generator=g).tolist() for _ in prompt_ids]
            completions = [
                torch.randint(100, 20000, (response_tokens,), generator=g).tolist()
                for _ in range(len(prompts) * sampling.k)
            ]
            logprobs = [[-1.0] * response_tokens for _ in completions]
            return rows, Generations(prompts, completions, logprobs, ["length"] * len(completions), version, sampling.k)

        def after_update(self, version):
            pass

        def close(self):
            pass

    class Clock(Callback):
        resident_before = start = seconds = 0.0

        def on_train_start(self, trainer, module):
            self.resident_before = psutil.Process().memory_info().rss

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seconds = time.perf_counter() - self.start

    L.seed_everything(0)
    module = RLOO(
        policy="builtin:smollm2",
        reward=Parity(),
        k=2,
        max_new_tokens=response_tokens,
        micro_batch_size=micro,
        gradient_checkpointing=checkpointing,
        missing_eos_penalty=None,
    )
    module.configure_model()
    module.use_rollout_source(FixedShape())
    clock = Clock()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module, PromptDataModule("builtin:arithmetic_prompts", prompt_column="messages", batch_size=sequences // 2)
    )
    return {
        "device": "cpu",
        "model": "SmolLM2-135M-Instruct (float32)",
        "params": sum(p.numel() for p in module.policy.parameters()),
        "batch_sequences": sequences,
        "micro_batch_size": micro,
        "gradient_checkpointing": checkpointing,
        "tokens_per_sequence": prompt_tokens + response_tokens,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "resident_before_bytes": clock.resident_before,
        "step_seconds": clock.seconds,
    }


def measure(args: argparse.Namespace, sequences: int, micro: int | None, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([sequences, micro, checkpointing])]
    command += ["--prompt_tokens", str(args.prompt_tokens), "--response_tokens", str(args.response_tokens)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(rows: list[dict], path: str) -> None:
    gib = 2**30
    lines = [
        f"One RLOO update (k = 2) of {rows[0]['model']}, {rows[0]['tokens_per_sequence']} tokens per sequence, "
        "each row a fresh process on this CPU. *Added* is the peak resident memory minus what the process held "
        "when training started (the policy, the reference and the tokenizer).",
        "",
        "| sequences | micro-batch | checkpointing | peak GiB | added GiB | step seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        added = (r["peak_bytes"] - r["resident_before_bytes"]) / gib
        micro = r["micro_batch_size"] or "whole"
        lines.append(
            f"| {r['batch_sequences']} | {micro} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{r['peak_bytes'] / gib:.2f} | {added:.2f} | {r['step_seconds']:.1f} |"
        )
    write_markdown(path, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--whole", type=int, nargs="*", default=[16, 32], help="batch sizes also run in one pass")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--response_tokens", type=int, default=32)
    parser.add_argument("--json", default=os.path.join(RESULTS, "memory.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sequences, micro, checkpointing = json.loads(args.child)
        print(json.dumps(one_row(sequences, micro, checkpointing, args.prompt_tokens, args.response_tokens)))
        return
    rows = []
    for checkpointing in (False, True):
        for sequences in args.sequences:
            rows.append(measure(args, sequences, args.micro, checkpointing))
            print(json.dumps(rows[-1]), flush=True)
    for sequences in args.whole:
        rows.append(measure(args, sequences, None, False))
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, {"workload": vars(args), "rows": rows})
    render(rows, os.path.splitext(args.json)[0] + ".md")


if __name__ == "__main__":
    main()
