"""What the RL modules keep in a checkpoint so a resumed run neither loses nor repeats a prompt.

An asynchronous run has prompts in flight when it is checkpointed: drawn from
the data loader, sent to the generator, not yet trained on. The checkpoint
keeps, per rank, the policy version, the batches drawn from the loader and
the prompts in flight; on resume each rank asks for its in-flight prompts
again first (with the checkpoint's weights), then the loader continues after
the last batch drawn. With several ranks (DDP, DeepSpeed) every rank has its
own prompts in flight (sampled by its own generator or by a shared one), so
they are gathered from all ranks when saving and each rank takes back its own.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.fabric.utilities.warnings import PossibleUserWarning

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import RolloutSource, SamplingConfig
from lightning_rlhf.modules.accumulation import _LightningModule


class RolloutCheckpointing(_LightningModule):
    """Mixin of :class:`~lightning_rlhf.modules.base.RLModuleBase`: policy version, batches drawn
    and prompts in flight in checkpoints."""

    batches_drawn = 0  # prompt batches taken from the data loader (some may still be in flight)
    _resubmit: list[list[dict]] = []  # after a resume: this rank's prompts that were in flight
    if TYPE_CHECKING:  # what RLModuleBase, which this mixin is part of, provides
        ref_policy: torch.nn.Module | None
        sampling: SamplingConfig
        policy_version: int

        @property
        def rollout_source(self) -> RolloutSource | None: ...

        def prompt_ids(self, rows: list[dict]) -> list[list[int]]: ...

    def on_fit_start(self) -> None:
        # Lightning warns "Found N module(s) in eval mode at the start of training". The frozen reference is
        # in eval mode on purpose (no dropout in its logprobs); when it is the only one, that message is
        # filtered, and only that message. Any other module left in eval mode keeps the warning.
        frozen = {id(m) for m in self.ref_policy.modules()} if self.ref_policy is not None else set()
        if all(m.training or id(m) in frozen for m in self.modules()):
            warnings.filterwarnings(
                "ignore",
                message=r"Found \d+ module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )

    def on_batch_drawn(self) -> None:
        """Count a batch drawn from the loader; after a resume, first ask again for the checkpoint's
        prompts in flight."""
        self.batches_drawn += 1
        if self._resubmit and self.rollout_source is not None:
            self.rollout_source.resubmit(self._resubmit, self.prompt_ids, self.sampling, self.policy_version)
            self._resubmit = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        pending = self.rollout_source.pending_rows() if self.rollout_source is not None else []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            per_rank: list = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, pending)  # every rank saves; all take part
        else:
            per_rank = [pending]
        checkpoint["rollouts"] = {
            "policy_version": self.policy_version,
            "batches_drawn": self.batches_drawn,
            "pending_per_rank": per_rank,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rollouts", {})
        self.policy_version = state.get("policy_version", 0)
        self.batches_drawn = state.get("batches_drawn", 0)
        per_rank = state.get("pending_per_rank", [state.get("pending", [])])
        trainer = self._trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(per_rank) != world_size and any(per_rank):
            # each rank's prompts in flight and its place in the data belong to that rank's shard: another
            # number of ranks would drop some prompts and repeat others
            raise ConfigError(
                f"The checkpoint was saved by {len(per_rank)} rank(s) with prompts in flight "
                f"and is resumed on {world_size}; "
                f"resume on {len(per_rank)} rank(s) (trainer.devices x num_nodes), or start a new run from its weights."
            )
        self._resubmit = list(per_rank[rank]) if rank < len(per_rank) else []
        # the data loader's sampler follows ``batches_drawn`` and continues with the next prompt
        # (see RLModuleBase.setup)
