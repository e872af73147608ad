"""Two "nodes" on one machine: the multi-node launch of docs/recipes.md, with Lightning as the distributed engine.

Two processes run ``python -m lightning_rlhf.cli fit`` with ``trainer.num_nodes 2`` and
``devices 1``, ``NODE_RANK`` 0 and 1 and ``MASTER_ADDR`` on the loopback address, as
two machines would (each machine runs the same command with its own ``NODE_RANK``).
A small callback, loaded from a file the test writes, reports what each rank did.
"""

import json
import os
import socket
import subprocess
import sys
import uuid

import psutil
import pytest

pytestmark = pytest.mark.slow  # starts two training processes and their generators

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = '''
import json, os
from lightning.pytorch.callbacks import Callback

class RankReport(Callback):
    """Each rank writes its rank, steps, refreshes and the prompts it trained on."""

    def __init__(self, folder: str) -> None:
        self.folder, self.prompts = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:
            self.prompts += [row["prompt"] for row in outputs["rows"]]

    def on_train_end(self, trainer, pl_module):
        source = pl_module.rollout_source
        report = {
            "rank": trainer.global_rank, "node_rank": trainer.node_rank, "world_size": trainer.world_size,
            "steps": trainer.global_step, "prompts": self.prompts,
            "refreshes": [[r.version, r.reason] for r in source.refreshes],
        }
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)
'''
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  log_every_n_steps: 1
  enable_progress_bar: false
  strategy:
    class_path: lightning_rlhf.strategies.AsyncRLHFDDPStrategy
    init_args:
      generation:
        backend: transformers
        max_staleness: 1
        sync_every: 1
        shared_generator: {shared}
model:
  class_path: lightning_rlhf.modules.OnlineDPO
  init_args:
    policy: builtin:sft
    k: 2
    max_new_tokens: 8
data:
  class_path: lightning_rlhf.data.PromptDataModule
  init_args:
    batch_size: 4
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("shared", [False, True], ids=["a generator per node", "shared generator"])
def test_two_nodes_train_together_and_leave_nothing_behind(shared, tmp_path):
    (tmp_path / "rank_report.py").write_text(REPORT)
    (tmp_path / "config.yaml").write_text(CONFIG.format(shared=str(shared).lower()))
    tag = uuid.uuid4().hex  # every process of this run inherits it: none may be left afterwards
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(node_rank),
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "TWO_NODES_TEST": tag,
        }
        command = [
            sys.executable,
            "-m",
            "lightning_rlhf.cli",
            "fit",
            "--config",
            str(tmp_path / "config.yaml"),
            "--trainer.num_nodes",
            "2",
            "--trainer.devices",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / f"node{node_rank}"),
            "--trainer.callbacks+=rank_report.RankReport",
            "--trainer.callbacks.init_args.folder",
            str(tmp_path),
        ]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [node.communicate(timeout=400)[0].decode(errors="replace") for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]

    reports = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert [(r["rank"], r["node_rank"], r["world_size"]) for r in reports] == [(0, 0, 2), (1, 1, 2)]
    assert [r["steps"] for r in reports] == [3, 3]
    # each rank trained on its own shard of the prompts: 3 batches of 4
    assert all(len(r["prompts"]) == 12 for r in reports) and reports[0]["prompts"] != reports[1]["prompts"]
    # refreshes: one after every update (sync_every 1), on rank 1 too (its own generator, or its part in the shared one)
    for report in reports:
        assert [v for v, reason in report["refreshes"] if reason == "period"] == [1, 2, 3], report["refreshes"]
    left = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get("TWO_NODES_TEST") == tag:
                left.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert not left, f"processes left running: {left}"
