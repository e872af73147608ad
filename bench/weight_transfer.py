"""How long a weight refresh takes, what it holds the trainer up, and what it costs the generator's memory.

    python bench/weight_transfer.py                      # SmolLM2-135M's shape, every backend installed, gloo
    python bench/weight_transfer.py --shapes smollm2-135m llama-1b --buckets 64 256 4096
    python bench/weight_transfer.py --lora 0 16 --buckets 64  # full refreshes beside LoRA rank 16 adapter-only ones

For each model shape (random weights in the real architecture: no download),
each generation backend installed here, each transport this machine can run
(gloo on CPU; ``cuda_ipc`` and ``nccl`` on a GPU machine) and each bucket
size, a fresh process starts a generator, refreshes it once to warm up, then
``--refreshes`` times while a thread samples the memory of the generator and
every process it started (vLLM's engine and worker, where the weights land)
every 2 ms. A row holds the medians over the refreshes:

* ``seconds``: from the trainer's call until the generator has loaded the weights;
* ``trainer_hold_seconds``: what the call held the trainer up (packing; sending is in the background);
* ``generator_peak_extra_bytes``: the generator's peak resident memory during a refresh, above its
  level just before it; streaming should keep it near one bucket.

``--lora R`` (R > 0) wraps the policy with a rank-R LoRA adapter on the attention projections (random
adapter values) and refreshes the adapter alone, to a generator serving the base model with LoRA; rows
for several ranks (0: full weights) run one after the other in the same sitting.

Writes ``docs/results/weight_transfer.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

from common import RESULTS, SMOLLM2_135M_SHAPE, run_worker, write_json, write_markdown  # noqa: E402

MiB = 2**20
SHAPES = {
    # a few MiB, for the --quick smoke run
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": SMOLLM2_135M_SHAPE,
    # Llama 3.2 1B's shape (tied embeddings)
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
}


class MemoryWatch:
    """Samples the summed resident memory of a process and its descendants in a background thread."""

    def __init__(self, pid: int, every_s: float = 0.002) -> None:
        import psutil

        self.root, self.every_s = psutil.Process(pid), every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(self.every_s)

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def save_model(shape: str, folder: str) -> str:
    """A randomly initialised model of ``shape`` with a tokenizer, saved where a generator can load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlhf.tasks.copy.artifacts import make_tokenizer

    path = os.path.join(folder, shape)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=256)
    tokenizer = make_tokenizer()  # any tokenizer: the benchmark samples nothing
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def worker(spec: dict) -> dict:
    """One generator, measured (runs in its own interpreter)."""
    import torch

    from lightning_rlhf.generation.process import GeneratorProcess
    from lightning_rlhf.generation.weights import plan_buckets, policy_state, stream_of
    from lightning_rlhf.generation.worker import GeneratorSpec
    from lightning_rlhf.lora import LoRA, adapter_state, lora_dict, wrap
    from lightning_rlhf.models import load_policy

    torch.set_num_threads(1)
    on_gpu = spec["transport"] != "gloo" or spec["device"].startswith("cuda")
    dtype = "bfloat16" if on_gpu else "float32"
    model = load_policy(spec["model"], dtype).to(spec["trainer_device"])
    lora = LoRA(rank=spec["lora"], alpha=2.0 * spec["lora"]) if spec.get("lora") else None
    if lora is not None:
        model = wrap(model, lora)
        with torch.no_grad():  # a trained adapter's values (B starts at 0)
            for _, p in adapter_state(model):
                p.normal_(0.0, 0.02)
    tied_head = spec["backend"] == "vllm" and not on_gpu
    named = policy_state(model, tied_head)
    generator = GeneratorProcess(
        GeneratorSpec(
            backend=spec["backend"],
            model=spec["model"],
            dtype=dtype,
            device=spec["device"],
            cpu_cores=[0] if not on_gpu else None,
            vllm_kwargs={"max_model_len": 128},
            transport=spec["transport"],
            bucket_bytes=spec["bucket_bytes"],
            lora=lora_dict(lora),
        )
    )
    generator.start()
    if not on_gpu:
        os.sched_setaffinity(0, {1} if os.cpu_count() > 1 else {0})
    watch = MemoryWatch(generator.pid)
    rows = []
    try:
        for i in range(spec["refreshes"] + 1):
            stream = stream_of(named, getattr(torch, dtype))
            time.sleep(0.3)  # a quiet moment for the level before the refresh
            before = watch.rss()
            start = time.perf_counter()
            held = generator.push_weights(stream, version=i)
            generator.wait_loaded()
            end = time.perf_counter()
            time.sleep(0.05)
            if i:  # the first refresh warms allocators and compiled paths up
                rows.append(dict(seconds=end - start, held=held, extra=watch.peak_between(start, end) - before))
        total_bytes = sum(b.nbytes for b in plan_buckets(stream.meta, 2**62))
    finally:
        watch.stop()
        generator.close()
    return {
        "params": sum(p.numel() for p in model.parameters() if lora is None or p.requires_grad),
        "bytes": total_bytes,
        "buckets": len(plan_buckets(stream.meta, spec["bucket_bytes"])),
        "largest_bucket_bytes": max(b.nbytes for b in plan_buckets(stream.meta, spec["bucket_bytes"])),
        "seconds": statistics.median(r["seconds"] for r in rows),
        "trainer_hold_seconds": statistics.median(r["held"] for r in rows),
        "generator_peak_extra_bytes": int(statistics.median(r["extra"] for r in rows)),
    }


def note(row: dict) -> str:
    """Against the largest bucket sent: ``bucket_bytes``, more when one tensor alone is larger (the embedding), less
    when the whole model is smaller."""
    ratio = row["generator_peak_extra_bytes"] / row["largest_bucket_bytes"]
    largest = f" (the largest bucket, {row['largest_bucket_bytes'] / MiB:.0f} MiB)"
    if ratio <= 1.5:
        return f"streamed: peak extra {ratio:.2f}x one bucket{largest}"
    why = ""
    if row["backend"] == "vllm":
        why = (
            "; vLLM's layer-wise reload (vllm/model_executor/model_loader/reload/layerwise.py) keeps a layer's "
            "incoming tensors until the layer is complete, so a bucket whose last layer continues in the next "
            "stays while the next arrives, then re-creates the layer's weights and repacks them for its kernels "
            "(the total is measured; its split between the two is read from the source, not measured)"
        )
    return f"over the 1.5x streaming bound: peak extra {ratio:.2f}x one bucket{largest}{why}"


def main() -> None:
    import importlib.util

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m"], choices=SHAPES)
    parser.add_argument("--buckets", nargs="+", type=int, default=[64, 256], help="bucket sizes in MiB")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every one installed")
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lightning_rlhf_weight_transfer"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "weight_transfer"))
    parser.add_argument("--report", action="store_true", help="only rewrite the table from --out's JSON")
    parser.add_argument("--append", action="store_true", help="add the rows to those already in --out's JSON")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 MiB buckets, transformers: a smoke run")
    parser.add_argument("--lora", nargs="+", type=int, default=[0], help="LoRA ranks to refresh (0: full weights)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.buckets, args.backends, args.refreshes = ["tiny"], [1], ["transformers"], 1
        args.lora = [0, 8] if importlib.util.find_spec("peft") else [0]  # full weights, then an adapter alone
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.report:
        report(json.load(open(args.out + ".json")), args.out)
        return

    import torch

    backends = args.backends or ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if torch.cuda.is_available():
        layouts = [("cuda_ipc", "cuda:0", "cuda:0")]
        if torch.cuda.device_count() > 1:
            layouts.append(("nccl", "cuda:0", "cuda:1"))
        layouts.append(("gloo", "cuda:0", "cuda:0"))
    else:
        layouts = [("gloo", "cpu", "cpu")]
    rows = json.load(open(args.out + ".json"))["rows"] if args.append else []
    for shape in args.shapes:
        model = save_model(shape, args.workdir)
        for backend in backends:
            for transport, trainer_device, device in layouts:
                for bucket_mib, rank in ((b, r) for b in args.buckets for r in args.lora):
                    spec = dict(
                        lora=rank,
                        model=model,
                        backend=backend,
                        transport=transport,
                        trainer_device=trainer_device,
                        device=device,
                        bucket_bytes=bucket_mib * MiB,
                        refreshes=args.refreshes,
                    )
                    measured = run_worker(os.path.abspath(__file__), spec, timeout_s=1800)
                    row = dict(
                        shape=shape, transport=transport, backend=backend, bucket_bytes=bucket_mib * MiB, lora=rank
                    )
                    row.update(measured)
                    row["note"] = note(row)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    report({"machine": machine, "refreshes": args.refreshes, "rows": rows}, args.out)


def report(payload: dict, out: str) -> None:
    """Write ``out``.json and the markdown table (notes recomputed from the numbers)."""
    for row in payload["rows"]:
        row["note"] = note(row)
    write_json(out + ".json", payload)
    lines = [
        f"Weight refresh, medians of {payload['refreshes']} refreshes after a warm-up ({payload['machine']}; "
        "`python bench/weight_transfer.py`).",
        "",
        "| shape | transport | backend | LoRA rank (adapter only) | params sent | bytes sent | bucket_bytes | buckets "
        "| refresh s | trainer held s | generator peak extra | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['shape']} | {r['transport']} | {r['backend']} | {r.get('lora') or 'no (full)'} "
            f"| {r['params'] / 1e6:.2f}M | {r['bytes'] / MiB:.2f} MiB | {r['bucket_bytes'] / MiB:.0f} MiB "
            f"| {r['buckets']} | {r['seconds']:.2f} "
            f"| {r['trainer_hold_seconds']:.2f} | {r['generator_peak_extra_bytes'] / MiB:.0f} MiB | {r['note']} |"
        )
    write_markdown(out + ".md", lines)


if __name__ == "__main__":
    main()
