"""Bad strategy arguments stop with one sentence, before any process starts."""

import importlib.util

import pytest

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.strategies import (
    AsyncRLHFDDPStrategy,
    AsyncRLHFDeepSpeedStrategy,
    AsyncRLHFStrategy,
    GenerationConfig,
    async_rlhf,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="sglang"), "Unknown generation backend 'sglang'"),
        (dict(max_staleness=-1), "max_staleness must be 0"),
        (dict(sync_every=0), "sync_every must be at least 1"),
        (dict(num_generators=0), "num_generators must be at least 1"),
        (dict(bucket_bytes=1000), "bucket_bytes must be at least 1 MiB"),
        (dict(dtype="fp8"), "Unknown generator dtype 'fp8'"),
        (dict(score_on_generator=1.5), "score_on_generator must be true, false, 'auto' or the fraction"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**kwargs)


def test_every_strategy_takes_its_generation_options_in_one_config():
    config = GenerationConfig(backend="transformers", max_staleness=0, sync_every=2)
    for strategy in (AsyncRLHFStrategy(generation=config), AsyncRLHFDDPStrategy(generation=config)):
        assert strategy.generation is config
    assert AsyncRLHFStrategy().generation == GenerationConfig()  # defaults: all of GenerationConfig's
    with pytest.raises(ConfigError, match="AsyncRLHFStrategy trains on one device"):
        AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers", shared_generator=True))


def test_a_shared_generator_is_off_by_default_and_can_be_asked_for():
    assert (
        AsyncRLHFDDPStrategy(generation=GenerationConfig(backend="transformers")).generation.shared_generator is False
    )
    assert (
        AsyncRLHFDDPStrategy(
            generation=GenerationConfig(backend="transformers", shared_generator=True)
        ).generation.shared_generator
        is True
    )


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_a_shared_generator_under_zero3_is_accepted_but_not_its_restart():
    """The paper's chat layout (ZeRO-3 ranks beside one generator); rank 0 alone could not refit a replacement."""
    assert AsyncRLHFDeepSpeedStrategy(
        stage=3, generation=GenerationConfig(backend="transformers", shared_generator=True)
    ).generation.shared_generator
    with pytest.raises(ConfigError, match="restart_on_failure cannot refit a shared generator under ZeRO-3"):
        AsyncRLHFDeepSpeedStrategy(
            stage=3, generation=GenerationConfig(backend="transformers", shared_generator=True, restart_on_failure=True)
        )


def test_generator_dtype_auto_is_bfloat16_on_gpu_and_float32_on_cpu():
    from lightning_rlhf.generation.pipeline import resolve_dtype

    assert AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers")).generation.dtype == "auto"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float32", "cuda:1") == "float32"  # an explicit choice stays


def test_score_on_generator_is_a_share_of_each_batch():
    assert AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers")).generation.score_on_generator == 0.0
    assert (
        AsyncRLHFStrategy(
            generation=GenerationConfig(backend="transformers", score_on_generator=True)
        ).generation.score_on_generator
        == 1.0
    )
    assert (
        AsyncRLHFStrategy(
            generation=GenerationConfig(backend="transformers", score_on_generator=0.6)
        ).generation.score_on_generator
        == 0.6
    )
    assert (
        AsyncRLHFStrategy(
            generation=GenerationConfig(backend="transformers", score_on_generator="auto")
        ).generation.score_on_generator
        == "auto"
    )


def test_unknown_weight_transport_is_refused():
    with pytest.raises(ConfigError, match="Unknown weight_transport 'ucx'"):
        AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers", weight_transport="ucx"))


def test_nccl_needs_two_different_gpus():
    import torch

    from lightning_rlhf.strategies.async_rlhf import check_transport

    with pytest.raises(ConfigError, match="needs the trainer and the generator on GPUs"):
        check_transport("nccl", torch.device("cpu"), "cpu")
    with pytest.raises(ConfigError, match="cannot join two processes on one GPU"):
        check_transport("nccl", torch.device("cuda", 0), "cuda:0")
    with pytest.raises(ConfigError, match="cannot join two processes on one GPU"):
        check_transport("nccl", torch.device("cuda", 1), "cuda:1,2")  # a tensor-parallel generator over the trainer's
    check_transport("nccl", torch.device("cuda", 0), "cuda:1")  # the paper's layout: accepted
    check_transport("nccl", torch.device("cuda", 0), "cuda:1,2")  # a tensor-parallel generator beside it
    check_transport("gloo", torch.device("cuda", 0), "cuda:0")  # gloo goes through host memory: any layout
    with pytest.raises(ConfigError, match="only backend: vllm can use"):
        check_transport("gloo", torch.device("cuda", 0), "cuda:1,2", backend="transformers")


def test_cuda_ipc_is_for_a_generator_on_the_trainers_own_gpu():
    import torch

    from lightning_rlhf.strategies.async_rlhf import check_transport

    check_transport("cuda_ipc", torch.device("cuda", 0), "cuda:0")
    with pytest.raises(ConfigError, match="shares memory on the trainer's own GPU"):
        check_transport("cuda_ipc", torch.device("cuda", 0), "cuda:1")
    with pytest.raises(ConfigError, match="needs the trainer and the generator on GPUs"):
        check_transport("cuda_ipc", torch.device("cpu"), "cpu")


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_vllm_parallel_sizes_come_from_the_devices_not_vllm_kwargs(key):
    """Else the side group would wait for generator ranks that never join (issue 30, defect d)."""
    with pytest.raises(ConfigError, match=rf"vllm_kwargs.{key} is set by the generator's devices here"):
        AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers", vllm_kwargs={key: 2}))


def test_two_generators_on_one_gpu_are_refused_unless_the_gpu_is_divided():
    """Slots wrapping around generator_devices put two generators on one GPU (defect f)."""
    strategy = AsyncRLHFStrategy(
        generation=GenerationConfig(backend="transformers", num_generators=2, generator_devices=["cuda:1"])
    )
    assert strategy._layout(0)[0] == "cuda:1"
    with pytest.raises(ConfigError, match="so two would share cuda:1"):
        strategy._layout(1)
    divided = AsyncRLHFStrategy(
        generation=GenerationConfig(
            backend="transformers",
            num_generators=2,
            generator_devices=["cuda:1"],
            vllm_kwargs={"gpu_memory_utilization": 0.4},
        )
    )
    assert divided._layout(1)[0] == "cuda:1"


def test_scoring_on_a_vllm_generator_s_gpu_needs_room_left_for_the_reward_model(monkeypatch, tiny_model_dir):
    """The reward model loads after vLLM took most of the GPU (defect f)."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    strategy = AsyncRLHFStrategy(
        generation=GenerationConfig(backend="vllm", generator_devices=["cuda:1"], score_on_generator=True)
    )
    monkeypatch.setattr(
        strategy, "_rl_module", lambda: SimpleNamespace(generation_seed=0, policy_source=tiny_model_dir)
    )
    monkeypatch.setattr(async_rlhf, "check_transport", lambda *args: None)  # no GPU here; the check comes after
    with pytest.raises(ConfigError, match="score_on_generator loads the reward model on cuda:1 after vLLM"):
        strategy._spec(0)
