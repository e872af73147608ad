"""The engine's two contracts: what an RL module offers, and what a rollout source offers.

Both are :class:`typing.Protocol` classes (:class:`RolloutSource` lives beside
its implementations in :mod:`lightning_rlhf.generation.source`) rather than base classes, so that a
module or a source written outside this package needs only the members below,
not our inheritance; ``runtime_checkable`` lets the strategies and callbacks
refuse anything else with one sentence (``isinstance`` checks the names, a
type checker the signatures).

Who reads and writes what, in one direction:

* A **strategy** reads an :class:`RLModule`'s ``policy``, ``policy_source`` and
  ``generation_seed`` to start a generator with the same architecture, weights
  and sampling streams, its ``reward`` to score on the generator
  (``score_on_generator``), and hands the module its rollout source once, with
  :meth:`RLModule.use_rollout_source`. It never reads anything else of the module.
* The **module** asks its source for rollouts (:meth:`RolloutSource.next_rollouts`),
  tells it when it made a new policy version (:meth:`RolloutSource.after_update`),
  and keeps the prompts in flight in its checkpoints (``pending_rows`` / ``resubmit``).
* The **source** alone decides when the generator's weights are refreshed:
  every ``sync_every`` versions, and whenever the staleness bound demands it.
  It records each refresh in ``refreshes``.
* **Callbacks** observe: ``WeightSync`` logs ``refreshes`` and probes the
  generator after a periodic one (the probe is the first rollout of the
  :class:`TrainedOn` a ``training_step`` returns), ``GoldEvaluation`` samples from ``policy``,
  ``OffPolicySimulation`` hands the module a different source. None writes a
  module attribute.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable

import torch

from lightning_rlhf.generation.base import Generations, SamplingConfig
from lightning_rlhf.generation.source import Refresh, RolloutSource, Row
from lightning_rlhf.lora import LoRA
from lightning_rlhf.rewards.base import RewardFunction

__all__ = ["RLModule", "Refresh", "RolloutSource", "TrainedOn"]


class TrainedOn(TypedDict):
    """What an RL module's ``training_step`` returns, for callbacks: the rows and rollouts it trained on."""

    rows: list[Row]
    generations: Generations


@runtime_checkable
class RLModule(Protocol):
    """What an RL LightningModule (``OnlineDPO``, ``RLOO``, ``PPO``) offers the engine."""

    policy: torch.nn.Module | None  # the weights being trained; ``None`` until ``configure_model``
    ref_policy: torch.nn.Module | None  # the frozen reference of the KL
    policy_source: str  # where the policy was loaded from (a generator process loads the architecture from it)
    tokenizer: Any  # the policy's tokenizer, a transformers one (eos and pad ids, decoding)
    sampling: SamplingConfig
    policy_version: int  # generated batches trained on; what staleness is counted in
    generation_seed: int  # base seed of the sampling streams
    reward: RewardFunction  # what scores the rollouts (a copy, unloaded, scores on the generator)
    lora: LoRA | None  # a LoRA policy's adapter (what a refresh sends), or None for full weights

    @property
    def rollout_source(self) -> RolloutSource | None:
        """The source ``training_step`` asks for rollouts (in-process until a strategy hands another)."""

    def use_rollout_source(self, source: RolloutSource) -> None:
        """Sample from ``source`` from now on (the previous one is closed)."""
