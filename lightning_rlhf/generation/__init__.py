"""Generation: backends behind one interface, the generator process, and the rollout sources built on them.

* ``base``: what crosses the process boundary (:class:`SamplingConfig`, :class:`Generations`);
* ``source``: the :class:`RolloutSource` contract every source follows;
* ``transformers_backend``, ``vllm_backend``: the backends; ``worker``: the code that runs inside the
  generator process; ``process``: the trainer's handle on it; ``weights``: its weight transport;
* ``in_process``, ``pipeline``, ``shared``: the rollout sources (in the training process, a generator process
  sampling ahead, one generator for several ranks).
"""

from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, truncate_at_stop
from lightning_rlhf.generation.source import Refresh, RolloutSource
from lightning_rlhf.generation.transformers_backend import TransformersBackend

__all__ = [
    "GenerationBackend",
    "Generations",
    "Refresh",
    "RolloutSource",
    "SamplingConfig",
    "TransformersBackend",
    "truncate_at_stop",
]
