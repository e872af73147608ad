"""Helpers shared by the benchmark scripts: building runs from the recipe YAMLs, writing results, plotting.

The scripts run as files (``python bench/<name>.py``), so this module is
imported as ``common`` from the scripts' own folder.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable

import lightning as L
from lightning.pytorch.callbacks import Callback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")

# SmolLM2-135M-Instruct's LlamaConfig arguments (tied embeddings): its shape, for random-weight stand-ins
SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def module_and_data(config: str, overrides: Iterable[str] = ()):
    """The LightningModule and DataModule of a recipe YAML (``configs/...``), with ``--key value`` overrides.

    Seeds everything with the config's ``seed_everything`` (override it like any key).
    The YAML's trainer is built and dropped: benchmarks make their own.
    """
    from lightning_rlhf.cli import RLHFCLI

    args = ["--config", os.path.join(ROOT, config), "--trainer.logger", "false", *overrides]
    cli = RLHFCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=None,
        run=False,
        args=args,
    )
    return cli.model, cli.datamodule


def quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer for measured runs: no logger, checkpoints, progress bar or model summary (they would cost time)."""
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


class StepClock(Callback):
    """Wall time at the end of every training step that reached a new policy version.

    ``times[i]`` is when ``versions[i]`` was reached; an asynchronous run's first
    step (filling the pipeline, no update) is recorded as version 0.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.versions: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.versions or pl_module.policy_version != self.versions[-1]:
            self.times.append(time.perf_counter())
            self.versions.append(pl_module.policy_version)


def write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def write_markdown(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lightning-rlhf[bench]'); skipping plots.")
        return None
    return plt


def run_worker(script: str, spec: dict, timeout_s: float = 3600) -> dict:
    """Run ``script --worker <spec as JSON>`` in a fresh interpreter and return the JSON of its last stdout line.

    Each measured run gets its own process, so no state (threads, pinning, RNG, caches)
    leaks from one run into the next, and processes it starts die with it.
    """
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout_s
    )
    if out.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
