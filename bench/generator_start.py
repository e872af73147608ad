"""How long a generator process takes to start when ``spawn`` runs the training script again in it, and when not.

    python bench/generator_start.py               # 5 starts of each, interleaved
    python bench/generator_start.py --repeats 10

``spawn`` runs the parent's ``__main__`` once more in every child it starts, unless
the child is told there is none (``lightning_rlhf.generation.process.main_not_rerun_unless_needed``,
which the generator uses whenever its spec refers to nothing in ``__main__``). This script stands for
the ``lightning-rlhf`` command: it imports ``lightning_rlhf.cli`` (Lightning, its CLI) at the top. It starts
a generator (transformers backend, the built-in tokenizer's tiny Llama, CPU) and closes it, ``--repeats``
times each way, the two ways alternating so that drift of the machine falls on both. A row: the seconds
from the call to ``start()`` until the generator is ready and has joined the weight-transfer group.

Writes ``docs/results/generator_start.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning_rlhf.cli  # noqa: E402, F401  (what `lightning-rlhf` imports, and a re-run imports again)
from common import RESULTS, write_json, write_markdown  # noqa: E402
from lightning_rlhf.generation import process  # noqa: E402
from lightning_rlhf.generation.worker import GeneratorSpec  # noqa: E402
from lightning_rlhf.tasks.copy import make_base_model, make_tokenizer  # noqa: E402

WAYS = {
    "script run again (spawn's default)": lambda payload: contextlib.nullcontext(),
    "script not run again": process.main_not_rerun_unless_needed,
}


def start_seconds(spec: GeneratorSpec, way) -> float:
    generator = process.GeneratorProcess(spec)
    saved, process.main_not_rerun_unless_needed = process.main_not_rerun_unless_needed, way
    try:
        begin = time.perf_counter()
        generator.start()
        return time.perf_counter() - begin
    finally:
        process.main_not_rerun_unless_needed = saved
        generator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(RESULTS, "generator_start"), help="path without extension")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as model:
        tokenizer = make_tokenizer()
        make_base_model(tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
        spec = GeneratorSpec(backend="transformers", model=model)
        seconds: dict[str, list[float]] = {name: [] for name in WAYS}
        for repeat in range(args.repeats):
            order = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
            for name in order:
                seconds[name].append(start_seconds(spec, WAYS[name]))
                print(f"{repeat}: {name}: {seconds[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    default, skipped = medians.values()
    write_json(args.out + ".json", {"repeats": args.repeats, "seconds": seconds, "median_seconds": medians})
    lines = [
        f"Generator start (transformers backend, tiny Llama, CPU), {args.repeats} starts each way, interleaved:",
        "",
        "| how the generator starts | median s | min s | max s |",
        "|---|---|---|---|",
        *(f"| {n} | {medians[n]:.2f} | {min(v):.2f} | {max(v):.2f} |" for n, v in seconds.items()),
        "",
        f"Ratio of the medians: {skipped / default:.2f} ({default - skipped:.2f} s less per start).",
    ]
    write_markdown(args.out + ".md", lines)


if __name__ == "__main__":
    main()
