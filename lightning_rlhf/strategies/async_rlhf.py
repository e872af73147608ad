"""Strategies that run generation asynchronously in generator process(es), beside Lightning's training.

The paper's asynchronous RLHF (Noukhovitch et al. 2025, Sec. 4): while the
trainer learns on batch ``i``, a generator process already samples batch
``i + 1`` with a slightly older policy; the generator's weights are refreshed
every ``sync_every`` versions over a side process group that Lightning does
not own (gloo on CPU). Each strategy here is a Lightning strategy plus that
machinery:

* ``async_rlhf`` (:class:`AsyncRLHFStrategy`): one training device;
* ``async_rlhf_ddp`` (:class:`AsyncRLHFDDPStrategy`): DDP, one generator per rank, or one on rank 0
  for all ranks (``shared_generator``);
* ``async_rlhf_deepspeed`` (:class:`AsyncRLHFDeepSpeedStrategy`): DeepSpeed ZeRO-2/3, one generator
  per rank, or one shared by all; ZeRO-3 parameters are gathered one at a time as they are packed.

Everything the strategy starts it also stops: at the end of ``fit``, on an
exception or Ctrl-C (``on_exception``), and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Generator
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_rlhf.contracts import RLModule, RolloutSource
from lightning_rlhf.data import check_context_length
from lightning_rlhf.dtypes import torch_dtype
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.pipeline import PipelinedSource, ScoringBalance, resolve_dtype
from lightning_rlhf.generation.pool import GeneratorPool
from lightning_rlhf.generation.process import GeneratorHandle, GeneratorProcess
from lightning_rlhf.generation.shared import SharedSource
from lightning_rlhf.generation.vllm_backend import vllm_lora_rank
from lightning_rlhf.generation.weights import DEFAULT_TIMEOUT_S, WeightStream, policy_state, stream_of
from lightning_rlhf.generation.worker import GeneratorSpec, gpu_indices
from lightning_rlhf.lora import lora_dict
from lightning_rlhf.models import resolve_source
from lightning_rlhf.scoring import RewardScorer
from lightning_rlhf.strategies.config import DEFAULT_GENERATION, GenerationConfig

# The mixin precedes a Lightning strategy in each class's MRO; type-checked as one, it may use its members.
if TYPE_CHECKING:
    from lightning.pytorch.strategies import ParallelStrategy as _StrategyBase
else:
    _StrategyBase = object


class _AsyncGeneration(_StrategyBase):
    """What the asynchronous strategies add to a Lightning strategy (see the module docstring)."""

    def _init_async(self, config: GenerationConfig) -> None:
        self.generation = config
        self._generator: GeneratorHandle | None = None
        self._pipeline: PipelinedSource | None = None  # this rank's, when it owns a generator

    def _layout(self, index: int = 0) -> tuple[str, list[int] | None, list[int] | None]:
        """Device of this rank's ``index``-th generator, and CPU cores for generators and trainer.

        On CPU the generators and the trainer get separate cores by default.
        """
        config, local_rank = self.generation, getattr(self, "local_rank", 0) or 0
        if config.generator_devices:
            slot = local_rank * config.num_generators + index
            device = config.generator_devices[slot % len(config.generator_devices)]
            sized = any(key in config.vllm_kwargs for key in ("gpu_memory_utilization", "kv_cache_memory_bytes"))
            if slot >= len(config.generator_devices) and device.startswith("cuda") and not sized:
                raise ConfigError(
                    f"generator_devices lists {len(config.generator_devices)} device(s) for {slot + 1} or more "
                    f"generators on this node (num_generators x ranks), so two would share {device}, "
                    "each asking for most of its memory; list one GPU per generator, "
                    "or divide the GPU with vllm_kwargs.gpu_memory_utilization."
                )
            return device, config.generator_cores, config.trainer_cores
        if self.root_device.type == "cuda":
            return str(self.root_device), config.generator_cores, config.trainer_cores
        cores = sorted(os.sched_getaffinity(0))
        if config.generator_cores is None and config.trainer_cores is None and len(cores) >= 2 and self.world_size == 1:
            return "cpu", cores[:1], cores[1:]  # the paper's layout in miniature: generation beside training
        return "cpu", config.generator_cores, config.trainer_cores

    def _spec(self, index: int) -> GeneratorSpec:
        config, module = self.generation, self._rl_module()
        device, generator_cores, _ = self._layout(index)
        check_transport(config.weight_transport, self.root_device, device, config.backend)
        on_gpu = device.startswith("cuda")
        sized = any(key in config.vllm_kwargs for key in ("gpu_memory_utilization", "kv_cache_memory_bytes"))
        if on_gpu and config.score_on_generator and config.backend == "vllm" and not sized:
            raise ConfigError(
                f"score_on_generator loads the reward model on {device} after vLLM has taken its share of the GPU "
                "(most of it by default); leave it room with vllm_kwargs.gpu_memory_utilization (e.g. 0.6) "
                "or kv_cache_memory_bytes."
            )
        lora = module.lora if self._lora_refresh() == "adapter" else None  # the generator holds the adapter apart
        if lora is not None and config.backend == "vllm":
            vllm_lora_rank(lora.rank)  # a rank vLLM cannot serve is refused before any process starts
        model = resolve_source(module.policy_source, "policy model")
        return GeneratorSpec(
            backend=config.backend,
            model=model,
            dtype=resolve_dtype(config.dtype, device),
            seed=module.generation_seed + index,  # each generator its own sampling streams
            slot=(getattr(self, "local_rank", 0) or 0) * config.num_generators + index,
            first_call=self._pipeline.request_ids if self._pipeline is not None else 0,  # a replacement continues
            device=device,
            cpu_cores=generator_cores,
            vllm_kwargs=config.vllm_kwargs,
            transport=config.weight_transport,
            bucket_bytes=config.bucket_bytes,
            shares_gpu=on_gpu
            and self.root_device.type == "cuda"
            and (self.root_device.index or 0) in gpu_indices(device),
            scorer=self._scorer(model),
            lora=lora_dict(lora),
        )

    def _scorer(self, model: str) -> RewardScorer | None:
        """What scores in the generator process (``score_on_generator``); with ``"auto"`` each request says how much."""
        share = self.generation.score_on_generator
        if not share:
            return None
        return RewardScorer(self._rl_module().reward.unloaded_copy(), model, 1.0 if share == "auto" else share)

    def _new_generator(self) -> GeneratorHandle:
        """Start this rank's generator(s); a restart first closes the one before
        (a replacement that failed to start included)."""
        specs = [self._spec(i) for i in range(self.generation.num_generators)]
        self.stop_generator()  # idempotent: the pipeline closed a dead one already, not one that failed to start
        generator: GeneratorHandle = (
            GeneratorProcess(specs[0]) if len(specs) == 1 else GeneratorPool([GeneratorProcess(s) for s in specs])
        )
        self._generator = generator  # set before it starts: a start that fails leaves it, so stop_generator ends it
        generator.start()
        return generator

    def _rl_module(self) -> RLModule:
        module = self.lightning_module
        if not isinstance(module, RLModule):
            raise ConfigError(
                f"{type(self).__name__} generates for an RL module (OnlineDPO, RLOO, PPO), "
                f"not {type(module).__name__}; use the default strategy for it."
            )
        return module

    def start_generator(self) -> None:
        """Start this rank's generator(s) (or take part in the shared one) and hand the module its rollout source."""
        config, module = self.generation, self._rl_module()
        context = config.vllm_kwargs.get("max_model_len") if config.backend == "vllm" else None
        # the trainer's datamodule, read through the strategy's own handle on the module (not the RLModule contract)
        max_prompt_tokens = getattr(self.lightning_module.trainer.datamodule, "max_prompt_tokens", None)
        check_context_length(max_prompt_tokens, module.sampling.max_new_tokens, context, "vllm_kwargs.max_model_len")
        owner = not config.shared_generator or self.global_rank == 0
        generator = self._new_generator() if owner else None
        if generator is not None:
            atexit.register(self.stop_generator)
        _, _, trainer_cores = self._layout()
        if trainer_cores:  # pin after the child started, so it did not inherit the trainer's mask
            os.sched_setaffinity(0, set(trainer_cores))
            torch.set_num_threads(len(trainer_cores))
        source: RolloutSource | None = None
        if generator is not None:
            restart = self._new_generator if config.restart_on_failure else None
            balance = ScoringBalance(config.num_generators) if config.score_on_generator == "auto" else None
            source = self._pipeline = PipelinedSource(
                generator,
                config.max_staleness,
                config.sync_every,
                self.policy_weights,
                restart=restart,
                balance=balance,
            )
        if config.shared_generator:
            # every rank takes part in creating the group; prompts and rollouts travel over it as objects
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))  # ours, not torch's
            source = SharedSource(self._pipeline, group, config.sync_every, config.max_staleness, self.policy_weights)
        assert source is not None  # every rank owns a generator unless one is shared
        module.use_rollout_source(source)

    def policy_weights(self) -> WeightStream:
        """The policy's weights to send, cast to the generator's dtype (subclasses gather sharded parameters)."""
        module = self._rl_module()
        return stream_of(policy_state(module.policy, self._tied_head(), self._lora_refresh()), self._generator_dtype())

    def _generator_dtype(self) -> torch.dtype:
        return torch_dtype(resolve_dtype(self.generation.dtype, self._layout()[0]))

    def _lora_refresh(self) -> str:
        """What a LoRA policy's refresh sends (``"adapter"`` or ``"merged"``); said once in the log."""
        lora = self._rl_module().lora
        refresh = lora.refresh if lora is not None else "full"
        if lora is not None and not getattr(self, "_said_lora_refresh", False):
            self._said_lora_refresh = True
            what = "its adapter alone" if refresh == "adapter" else "its weights merged, under the base model's names"
            rank_zero_info(f"lightning-rlhf: a refresh sends the LoRA policy's {what} (lora.refresh: {refresh})")
        return refresh

    def _tied_head(self) -> bool:
        """vLLM on CPU needs a tied ``lm_head.weight`` sent; its GPU loaders skip it (see ``policy_state``)."""
        return self.generation.backend == "vllm" and self._layout()[0] == "cpu"

    def stop_generator(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    @property
    def generator(self) -> GeneratorHandle | None:
        return self._generator

    # Lightning hooks, cooperative with the strategy class that follows this mixin in the MRO.

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if dist.is_initialized() and dist.get_backend() == "gloo":
            # Lightning destroys an NCCL world at exit, not a gloo one (fabric/utilities/distributed.py,
            # _init_dist_connection), and DeepSpeed neither; a gloo group left to interpreter shutdown can abort
            # the process after a finished run (pytorch/pytorch#190489). Registered once per process.
            atexit.unregister(_destroy_process_groups)
            atexit.register(_destroy_process_groups)
        self.start_generator()

    def on_exception(self, exception: BaseException) -> None:
        self.stop_generator()
        super().on_exception(exception)

    def teardown(self) -> None:
        self.stop_generator()
        super().teardown()


def _destroy_process_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()  # every group: the world and a shared generator's own


class AsyncRLHFStrategy(_AsyncGeneration, SingleDeviceStrategy):
    """Single-device training with generation in a separate process.

    Args:
        generation: How and where to generate, and how weights reach the generator
            (:class:`~lightning_rlhf.strategies.GenerationConfig`, one field per option; default: all defaults).
            From the command line, unset a list such as ``generator_devices`` with ``[]``: a nested ``null``
            reaches the config as the text ``'None'`` (jsonargparse).
        device: Training device (``"cpu"``, ``"cuda:0"``).

    Raises:
        ConfigError: On a ``shared_generator`` (one device has nothing to share) or, when training starts,
            a transport that cannot join the devices.
    """

    strategy_name = "async_rlhf"

    def __init__(self, generation: GenerationConfig = DEFAULT_GENERATION, device: str = "cpu") -> None:
        if generation.shared_generator:
            raise ConfigError(
                "shared_generator shares one generator among several ranks; AsyncRLHFStrategy trains on one device, "
                "so drop it (or use AsyncRLHFDDPStrategy)."
            )
        super().__init__(device=torch.device(device))
        self._init_async(generation)


class AsyncRLHFDDPStrategy(_AsyncGeneration, DDPStrategy):
    """DDP training with one generator process per rank, or one shared by all ranks.

    By default each rank has its own generator and samples its own prompts. With
    ``shared_generator=True`` global rank 0 runs the only generator (on
    ``generator_devices[0]``) and samples every rank's prompts in one request:
    the paper's layout of one generation device beside N training devices.

    Args:
        generation: As :class:`AsyncRLHFStrategy` (``shared_generator`` applies here).
        **ddp_kwargs: Every ``DDPStrategy`` argument.
    """

    strategy_name = "async_rlhf_ddp"

    def __init__(self, generation: GenerationConfig = DEFAULT_GENERATION, **ddp_kwargs) -> None:
        super().__init__(**ddp_kwargs)
        self._init_async(generation)


class AsyncRLHFDeepSpeedStrategy(_AsyncGeneration, DeepSpeedStrategy):
    """DeepSpeed ZeRO training with a generator process per rank or one shared; ZeRO-3 weights are gathered as sent.

    Runs on CUDA and, for testing, on CPU with gloo (Lightning's own DeepSpeed strategy
    accepts CUDA only; DeepSpeed itself runs on CPU). Under ZeRO-3 each parameter is
    gathered only while it is packed, by every rank at every refresh.

    Args:
        generation: As :class:`AsyncRLHFStrategy` (``shared_generator`` applies here: one generator on
            rank 0 for every rank; under ZeRO-3 the paper's chat layout).
        stage: ZeRO stage, 2 or 3.
        **deepspeed_kwargs: Every other ``DeepSpeedStrategy`` argument.

    Raises:
        ConfigError: For ``restart_on_failure`` with a shared generator under ZeRO-3 (rank 0 alone cannot
            gather the weights to refit a replacement).
    """

    strategy_name = "async_rlhf_deepspeed"

    def __init__(self, generation: GenerationConfig = DEFAULT_GENERATION, stage: int = 3, **deepspeed_kwargs) -> None:
        if generation.shared_generator and stage == 3 and generation.restart_on_failure:
            raise ConfigError(
                "restart_on_failure cannot refit a shared generator under ZeRO-3 "
                "(rank 0 alone cannot gather the sharded weights); turn one of them off."
            )
        super().__init__(stage=stage, **deepspeed_kwargs)
        self._init_async(generation)

    @override
    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":
            DDPStrategy.setup_environment(self)  # skips the CUDA-only check; setup_distributed is still DeepSpeed's
        else:
            super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        if self.root_device.type != "cpu":
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # as DeepSpeedStrategy does, minus its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if self.root_device.type != "cpu":
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        # deepspeed.initialize reads the rank from the device index, which a CPU device lacks
        devices = self.parallel_devices
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(devices))]
        try:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        finally:
            self.parallel_devices = devices

    @override
    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        yield  # modules load whole pretrained weights; deepspeed.initialize partitions them afterwards

    @override
    def policy_weights(self) -> WeightStream:
        """Gathered one parameter at a time while it is packed (a collective: every rank reads the stream)."""
        import deepspeed

        def gather(param: torch.Tensor):
            return deepspeed.zero.GatheredParameters([param], modifier_rank=None)

        policy = self._rl_module().policy
        return stream_of(policy_state(policy, self._tied_head(), self._lora_refresh()), self._generator_dtype(), gather)


def check_transport(transport: str, trainer_device: torch.device, generator_device: str, backend: str = "vllm") -> None:
    """Say before any process starts when the transport (or the backend) cannot serve these devices."""
    if generator_device.startswith("cuda") and len(gpu_indices(generator_device)) > 1 and backend != "vllm":
        raise ConfigError(
            f"Generator device {generator_device} names several GPUs (tensor parallelism), "
            "which only backend: vllm can use; name one GPU per generator."
        )
    if transport == "gloo":
        return
    if trainer_device.type != "cuda" or not generator_device.startswith("cuda"):
        raise ConfigError(
            f"weight_transport {transport!r} needs the trainer and the generator on GPUs "
            f"(here {trainer_device} and {generator_device}); use 'gloo'."
        )
    same_gpu = (trainer_device.index or 0) in gpu_indices(generator_device)
    if transport == "nccl" and same_gpu:
        raise ConfigError(
            f"weight_transport 'nccl' cannot join two processes on one GPU ({generator_device}); "
            "give the generator its own with generator_devices, or use 'cuda_ipc'."
        )
    if transport == "cuda_ipc" and (not same_gpu or len(gpu_indices(generator_device)) > 1):
        raise ConfigError(
            f"weight_transport 'cuda_ipc' shares memory on the trainer's own GPU, "
            f"but the generator is on {generator_device}; use 'nccl' for a GPU of its own."
        )


for _cls in (AsyncRLHFStrategy, AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy):
    if _cls.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_cls.strategy_name, _cls, description=(_cls.__doc__ or "").splitlines()[0])
