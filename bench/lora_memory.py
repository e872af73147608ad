"""What a LoRA policy saves in memory: the reference it does not load, the optimizer state it does not keep.

    python bench/lora_memory.py                         # SmolLM2-135M-Instruct (builtin:smollm2), rank 16
    python bench/lora_memory.py --policy builtin:sft --ranks 8

Each variant (full weights, then LoRA at each rank) is built in a fresh process: an online DPO module on the
policy, ``configure_model``, one AdamW step on a stand-in loss (so the optimizer's state exists), then

* ``model_bytes``: the bytes of every distinct tensor the module holds (policy, reference, adapter);
* ``reference_bytes``: of those, the reference policy's own (0 when it is the policy with its adapter off);
* ``trainable``: parameters the optimizer updates; ``optimizer_state_bytes``: AdamW's two moments of them;
* ``rss_bytes``: the process's resident memory at that point (interpreter and libraries included).

Writes ``docs/results/lora_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, run_worker, write_json, write_markdown  # noqa: E402

MiB = 2**20


def worker(spec: dict) -> dict:
    import psutil
    import torch

    from lightning_rlhf.lora import LoRA
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.tasks import prepare

    if spec["policy"].startswith("builtin:"):
        prepare(spec["policy"])  # once, into the cache folder
    lora = LoRA(rank=spec["rank"], alpha=2.0 * spec["rank"]) if spec["rank"] else None
    module = OnlineDPO(policy=spec["policy"], lora=lora)
    module.configure_model()
    optimizer = module.optimizer_factory([p for p in module.policy.parameters() if p.requires_grad])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    module.policy(input_ids=ids).logits.float().mean().backward()  # a stand-in loss: the step creates the state
    optimizer.step()

    def distinct_bytes(tensors) -> int:
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())

    reference = [] if lora is not None else list(module.ref_policy.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "rank": spec["rank"],
        "model_bytes": distinct_bytes([*module.policy.parameters(), *module.ref_policy.parameters()]),
        "reference_bytes": distinct_bytes(reference),
        "trainable": sum(p.numel() for p in module.policy.parameters() if p.requires_grad),
        "optimizer_state_bytes": distinct_bytes(state),
        "rss_bytes": psutil.Process().memory_info().rss,
    }


def report(payload: dict, out: str) -> None:
    write_json(out + ".json", payload)
    lines = [
        f"Memory of an online DPO module on `{payload['policy']}` after one AdamW step, float32, one process per "
        f"row (`python bench/lora_memory.py`; {payload['machine']}).",
        "",
        "| LoRA rank | trainable params | model tensors | of which the reference | AdamW state | process RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['rank'] or 'no (full weights)'} | {r['trainable'] / 1e6:.2f}M | {r['model_bytes'] / MiB:.0f} MiB "
            f"| {r['reference_bytes'] / MiB:.0f} MiB | {r['optimizer_state_bytes'] / MiB:.1f} MiB "
            f"| {r['rss_bytes'] / MiB:.0f} MiB |"
        )
    write_markdown(out + ".md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="builtin:smollm2")
    parser.add_argument("--ranks", nargs="+", type=int, default=[16], help="LoRA ranks beside the full-weight row")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lora_memory"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = [run_worker(os.path.abspath(__file__), {"policy": args.policy, "rank": r}) for r in [0, *args.ranks]]
    for row in rows:
        print(json.dumps(row), flush=True)
    report({"policy": args.policy, "machine": f"CPU, {os.cpu_count()} cores", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
