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
  per rank (or shared under ZeRO-2); ZeRO-3 parameters are gathered before they are sent.

Everything the strategy starts it also stops: at the end of ``fit``, on an
exception or Ctrl-C (``on_exception``), and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Generator
from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, StrategyRegistry
from typing_extensions import override

from lightning_rlhf.callbacks.weight_sync import WeightSync
from lightning_rlhf.contracts import RLModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.pipeline import PipelinedSource
from lightning_rlhf.generation.process import GeneratorProcess, GeneratorSpec
from lightning_rlhf.generation.shared import SharedSource
from lightning_rlhf.generation.weights import policy_state
from lightning_rlhf.models import resolve_source
from lightning_rlhf.strategies.config import GenerationConfig


class _AsyncGeneration:
    """What the asynchronous strategies add to a Lightning strategy (see the module docstring)."""

    def _init_async(self, config: GenerationConfig) -> None:
        self.generation = config
        self._generator: GeneratorProcess | None = None

    def _layout(self) -> tuple[str, list[int] | None, list[int] | None]:
        """Generator device and CPU cores for generator and trainer (separate cores by default on CPU)."""
        config, local_rank = self.generation, getattr(self, "local_rank", 0) or 0
        if config.generator_devices:
            return (
                config.generator_devices[local_rank % len(config.generator_devices)],
                config.generator_cores,
                config.trainer_cores,
            )
        if self.root_device.type == "cuda":
            return str(self.root_device), config.generator_cores, config.trainer_cores
        cores = sorted(os.sched_getaffinity(0))
        if config.generator_cores is None and config.trainer_cores is None and len(cores) >= 2 and self.world_size == 1:
            return "cpu", cores[:1], cores[1:]  # the paper's layout in miniature: generation beside training
        return "cpu", config.generator_cores, config.trainer_cores

    def _new_generator(self) -> GeneratorProcess:
        device, generator_cores, _ = self._layout()
        check_transport(self.generation.weight_transport, self.root_device, device)
        module = self._rl_module()
        spec = GeneratorSpec(
            backend=self.generation.backend,
            model=resolve_source(module.policy_source, "policy model"),
            dtype=self.generation.dtype,
            seed=module.generation_seed,
            device=device,
            cpu_cores=generator_cores,
            vllm_kwargs=self.generation.vllm_kwargs,
            transport=self.generation.weight_transport,
        )
        self._generator = GeneratorProcess(spec)
        self._generator.start()
        return self._generator

    def _rl_module(self) -> RLModule:
        module = self.lightning_module
        if not isinstance(module, RLModule):
            raise ConfigError(
                f"{type(self).__name__} generates for an RL module (OnlineDPO, RLOO, PPO), not {type(module).__name__}; use the default strategy for it."
            )
        return module

    def start_generator(self) -> None:
        """Start this rank's generator (or take part in the shared one) and hand the module its rollout source."""
        config, module = self.generation, self._rl_module()
        owner = not config.shared_generator or self.global_rank == 0
        if owner:
            self._new_generator()
            atexit.register(self.stop_generator)
        _, _, trainer_cores = self._layout()
        if trainer_cores:  # pin after the child started, so it did not inherit the trainer's mask
            os.sched_setaffinity(0, set(trainer_cores))
            torch.set_num_threads(len(trainer_cores))
        source = None
        if owner:
            restart = self._new_generator if config.restart_on_failure else None
            weights = self.policy_weights
            source = PipelinedSource(self._generator, config.max_staleness, config.sync_every, weights, restart=restart)
        if config.shared_generator:
            # every rank takes part in creating the group; prompts and rollouts travel over it as objects
            source = SharedSource(source, dist.new_group(backend="gloo"), config.sync_every)
        module.use_rollout_source(source)

    def policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The policy's tensors to send (subclasses gather sharded parameters first)."""
        return policy_state(self._rl_module().policy)

    def stop_generator(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    @property
    def generator(self) -> GeneratorProcess | None:
        return self._generator

    # Lightning hooks, cooperative with the strategy class that follows this mixin in the MRO.

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.start_generator()
        if not any(isinstance(c, WeightSync) for c in trainer.callbacks):  # the refreshes are logged and probed
            trainer.callbacks.append(WeightSync())

    def on_exception(self, exception: BaseException) -> None:
        self.stop_generator()
        super().on_exception(exception)

    def teardown(self) -> None:
        self.stop_generator()
        super().teardown()


class AsyncRLHFStrategy(_AsyncGeneration, SingleDeviceStrategy):
    """Single-device training with generation in a separate process.

    Args:
        backend: ``"vllm"``, ``"transformers"``, or ``"auto"`` (vLLM when installed).
        max_staleness: How many versions old a trained rollout may be: 0 synchronous, 1 the paper's asynchronous setting.
        sync_every: Refresh the generator's weights every this many versions (the rollout source does;
            the ``WeightSync`` callback, added when missing, logs and probes each refresh).
        device: Training device (``"cpu"``, ``"cuda:0"``).
        generator_devices: Devices of the generator(s), e.g. ``["cuda:1"]``; default: beside the trainer.
        generator_cores: CPU cores for the generator; default on CPU: the first core.
        trainer_cores: CPU cores for the trainer; default on CPU: the other cores.
        dtype: Generator weights dtype (``float32`` keeps its logprobs equal to the trainer's).
        vllm_kwargs: Extra ``vllm.LLM`` arguments (``max_model_len``, ``kv_cache_memory_bytes``, ...).
        restart_on_failure: Restart a dead generator and carry on instead of stopping.
        weight_transport: How refreshed weights travel: ``"gloo"`` through host memory (any devices,
            the tested path) or ``"nccl"`` GPU to GPU (the generator on a GPU of its own; not yet run
            on GPUs by this project's tests).

    Raises:
        ConfigError: On an unknown backend or transport, a negative ``max_staleness``, ``sync_every < 1``,
            vLLM missing, or (when training starts) NCCL without two different GPUs.
    """

    strategy_name = "async_rlhf"

    def __init__(
        self,
        backend: Literal["auto", "transformers", "vllm"] = "auto",
        max_staleness: int = 1,
        sync_every: int = 1,
        device: str = "cpu",
        generator_devices: list[str] | None = None,
        generator_cores: list[int] | None = None,
        trainer_cores: list[int] | None = None,
        dtype: str = "float32",
        vllm_kwargs: dict | None = None,
        restart_on_failure: bool = False,
        weight_transport: Literal["gloo", "nccl"] = "gloo",
    ) -> None:
        config = GenerationConfig(
            backend=backend,
            max_staleness=max_staleness,
            sync_every=sync_every,
            generator_devices=generator_devices,
            generator_cores=generator_cores,
            trainer_cores=trainer_cores,
            dtype=dtype,
            vllm_kwargs=vllm_kwargs,
            restart_on_failure=restart_on_failure,
            weight_transport=weight_transport,
        )
        super().__init__(device=torch.device(device))
        self._init_async(config)


class AsyncRLHFDDPStrategy(_AsyncGeneration, DDPStrategy):
    """DDP training with one generator process per rank, or one shared by all ranks.

    By default each rank has its own generator and samples its own prompts. With
    ``shared_generator=True`` global rank 0 runs the only generator (on
    ``generator_devices[0]``) and samples every rank's prompts in one request:
    the paper's layout of one generation device beside N training devices.

    Args: as :class:`AsyncRLHFStrategy`, plus ``shared_generator`` and every ``DDPStrategy``
    argument through ``ddp_kwargs``.
    """

    strategy_name = "async_rlhf_ddp"

    def __init__(
        self,
        backend: Literal["auto", "transformers", "vllm"] = "auto",
        max_staleness: int = 1,
        sync_every: int = 1,
        generator_devices: list[str] | None = None,
        generator_cores: list[int] | None = None,
        trainer_cores: list[int] | None = None,
        dtype: str = "float32",
        vllm_kwargs: dict | None = None,
        restart_on_failure: bool = False,
        shared_generator: bool = False,
        weight_transport: Literal["gloo", "nccl"] = "gloo",
        **ddp_kwargs,
    ) -> None:
        config = GenerationConfig(
            backend=backend,
            max_staleness=max_staleness,
            sync_every=sync_every,
            generator_devices=generator_devices,
            generator_cores=generator_cores,
            trainer_cores=trainer_cores,
            dtype=dtype,
            vllm_kwargs=vllm_kwargs,
            restart_on_failure=restart_on_failure,
            shared_generator=shared_generator,
            weight_transport=weight_transport,
        )
        super().__init__(**ddp_kwargs)
        self._init_async(config)


class AsyncRLHFDeepSpeedStrategy(_AsyncGeneration, DeepSpeedStrategy):
    """DeepSpeed ZeRO training with one generator process per rank; ZeRO-3 weights are gathered before sending.

    Runs on CUDA and, for testing, on CPU with gloo (Lightning's own DeepSpeed strategy
    accepts CUDA only; DeepSpeed itself runs on CPU).

    Args: as :class:`AsyncRLHFStrategy`, plus ``stage`` (2 or 3), ``shared_generator`` (stage 2 only:
    one generator on rank 0 for every rank, as in :class:`AsyncRLHFDDPStrategy`) and every
    ``DeepSpeedStrategy`` argument through ``deepspeed_kwargs``.

    Raises:
        ConfigError: As :class:`AsyncRLHFStrategy`, and for ``shared_generator`` under ZeRO-3.
    """

    strategy_name = "async_rlhf_deepspeed"

    def __init__(
        self,
        backend: Literal["auto", "transformers", "vllm"] = "auto",
        max_staleness: int = 1,
        sync_every: int = 1,
        stage: int = 3,
        generator_devices: list[str] | None = None,
        generator_cores: list[int] | None = None,
        trainer_cores: list[int] | None = None,
        dtype: str = "float32",
        vllm_kwargs: dict | None = None,
        restart_on_failure: bool = False,
        shared_generator: bool = False,
        weight_transport: Literal["gloo", "nccl"] = "gloo",
        **deepspeed_kwargs,
    ) -> None:
        if shared_generator and stage == 3:
            raise ConfigError(
                "shared_generator sends rank 0's weights, but ZeRO-3 shards them over the ranks; use stage 2, or one generator per rank (shared_generator: false)."
            )
        config = GenerationConfig(
            backend=backend,
            max_staleness=max_staleness,
            sync_every=sync_every,
            generator_devices=generator_devices,
            generator_cores=generator_cores,
            trainer_cores=trainer_cores,
            dtype=dtype,
            vllm_kwargs=vllm_kwargs,
            restart_on_failure=restart_on_failure,
            shared_generator=shared_generator,
            weight_transport=weight_transport,
        )
        super().__init__(stage=stage, **deepspeed_kwargs)
        self._init_async(config)

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
    def policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        import deepspeed

        policy = self._rl_module().policy
        # a collective: every rank gathers at the same refresh
        with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
            return [(name, tensor.detach().clone()) for name, tensor in policy_state(policy)]


def check_transport(transport: str, trainer_device: torch.device, generator_device: str) -> None:
    """NCCL joins exactly two GPUs, one per process; say so before any process starts."""
    if transport != "nccl":
        return
    generator = torch.device(generator_device)
    if trainer_device.type != "cuda" or generator.type != "cuda":
        raise ConfigError(
            f"weight_transport 'nccl' needs the trainer and the generator on GPUs (here {trainer_device} and {generator}); use 'gloo'."
        )
    if generator == trainer_device or (generator.index or 0) == (trainer_device.index or 0):
        raise ConfigError(
            f"weight_transport 'nccl' cannot join two processes on one GPU ({generator}); give the generator its own with generator_devices, or use 'gloo'."
        )


for _cls in (AsyncRLHFStrategy, AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy):
    if _cls.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_cls.strategy_name, _cls, description=_cls.__doc__.splitlines()[0])
