"""Generation with a ``transformers`` causal LM, in the trainer's process or a generator process.

With ``share_weights=True`` (the synchronous default) the backend samples
from the training module itself, so a weight refresh is only a version bump.
In a generator process it holds its own copy and receives weights over the
side group.

Every ``generate`` call samples from its own RNG stream, seeded by ``(seed,
call index)``, so the same requests give the same samples in the trainer's
process and in a generator process, and generating never moves the trainer's
global RNG.

Sampling is :func:`sample`, a short loop that draws exactly what ``generate``
draws, with less work per call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_rlhf.forwards import cache_name, last_logits
from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, call_seed, truncate_at_stop
from lightning_rlhf.generation.weights import RefreshManifest, join_group, receive_buckets
from lightning_rlhf.lora import adapter_parameters, is_lora
from lightning_rlhf.losses import token_logprobs
from lightning_rlhf.tokens import left_pad, real_token_positions


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """Temperature-scaled logprobs of ``completion_ids`` following ``prompt_ids`` under ``model``, (t,) on the CPU."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    t = len(completion_ids)
    logits = model(input_ids=ids, **last_logits(model, t + 1)).logits[:, -t - 1 : -1]  # (1, t, v)
    return token_logprobs(logits, ids[:, len(prompt_ids) :], temperature)[0].cpu()


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    temperature: float,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` completions of each left-padded prompt: the new tokens (n*k, t) and each step's raw logits (n*k, t, v).

    Rows are prompt-major (prompt ``i``, sample ``j`` at ``i * k + j``); a row that has
    sampled a stop token is padded with ``pad_token_id`` from then on, and sampling ends
    when every row has stopped or after ``max_new_tokens``. ``temperature`` 0 decodes
    greedily.

    This is the sampling loop of transformers' ``generate`` with ``do_sample``,
    ``num_return_sequences=k`` and a temperature as its only logits processor
    (``GenerationMixin._sample`` in ``transformers/generation/utils.py``, followed
    step for step: float32 logits, softmax of ``logits / temperature``, one
    ``torch.multinomial`` per step over all rows, finished rows padded), so with the
    same RNG state it draws the same tokens (tested). It does less work: each prompt's
    prefill runs once and its key-value cache is repeated for its ``k`` samples
    (``Cache.batch_repeat_interleave``, ``transformers/cache_utils.py``) where
    ``generate`` runs the prompt ``k`` times, and none of ``generate``'s per-call
    set-up and per-step machinery runs. On the built-in task (64 prompts, k=2, 10 new
    tokens, one CPU thread) a call took 0.58-0.74 of ``generate``'s time, median 0.68
    (docs/results.md, section 3).
    """
    rows = ids.shape[0] * k
    positions = real_token_positions(mask)
    # the prefill's logits at the last position only, as generate's
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_logits(model, 1))
    cache = getattr(out, cache_name(model), None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(
            f"{type(model).__name__} returned no key-value cache with use_cache=True; the transformers backend samples "
            "with one (any transformers causal LM returns one)."
        )
    cache.batch_repeat_interleave(k)
    mask = mask.repeat_interleave(k, dim=0)
    position = positions[:, -1:].repeat_interleave(k, dim=0)
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)  # (n*k, v)
    stops = torch.tensor(sorted(stop_token_ids), device=ids.device)
    running = torch.ones(rows, dtype=torch.bool, device=ids.device)
    new_column = torch.ones(rows, 1, dtype=mask.dtype, device=ids.device)
    tokens, step_logits = [], []
    for step in range(max_new_tokens):
        step_logits.append(logits)
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1).squeeze(1)
        token = torch.where(running, token, pad_token_id)
        tokens.append(token)
        running &= ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not running.any():
            break
        mask = torch.cat([mask, new_column], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_name(model): cache},
        )
        logits = out.logits[:, -1].float()
    return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)


class TransformersBackend(GenerationBackend):
    """Pure-transformers sampling.

    Args:
        model: The causal LM to sample from.
        stop_token_ids: Token ids that end a completion (usually the eos token).
        pad_token_id: Id used for padding.
        share_weights: True when ``model`` is the training policy itself.
        batch_size: Prompts per ``generate`` call.
        seed: Base seed of the per-call RNG streams; ``None`` samples from the global RNG.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        stop_token_ids: list[int],
        pad_token_id: int,
        share_weights: bool = True,
        batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.stop_token_ids = set(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.share_weights = share_weights
        self.batch_size = batch_size
        self.seed = seed
        self.calls = 0
        self.policy_version = 0
        self._group = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Generations:
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        reasons: list[str] = []
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(call_seed(self.seed, self.calls))
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk_completions, chunk_logprobs, chunk_reasons = self._generate_chunk(
                    prompt_ids[start : start + self.batch_size], sampling
                )
                completions += chunk_completions
                logprobs += chunk_logprobs
                reasons += chunk_reasons
        if sampling.temperature > 0:  # a greedy (evaluation) request draws no random numbers: streams stay as they were
            self.calls += 1
        return Generations(prompt_ids, completions, logprobs, reasons, self.policy_version, sampling.k)

    def _generate_chunk(self, prompt_ids: list[list[int]], sampling: SamplingConfig):
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        new_tokens, logits = sample(
            self.model,
            ids.to(device),
            mask.to(device),
            sampling.k,
            sampling.temperature,
            sampling.max_new_tokens,
            sorted(self.stop_token_ids),
            self.pad_token_id,
        )  # (n*k, t), (n*k, t, v): raw logits (before the temperature)
        self.model.train(was_training)
        sampled_logprobs = token_logprobs(logits, new_tokens, sampling.temperature or 1.0)  # (n*k, t); greedy: unscaled
        results = [
            truncate_at_stop(t, lp, self.stop_token_ids)
            for t, lp in zip(new_tokens.tolist(), sampled_logprobs.tolist())
        ]
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    def connect(self, port: int, prefix: str, transport: str = "gloo", world_size: int = 2, timeout_s: float = 1800.0):
        self._transport = transport
        self._group = join_group(port, prefix, 1, world_size, timeout_s=timeout_s, transport=transport)

    def close(self) -> None:
        self._group = None  # now, not in interpreter shutdown, where a gloo group can abort (pytorch/pytorch#190489)

    def receive_weights(self, refit: RefreshManifest, version: int) -> None:
        """Copy each bucket into the parameters as it arrives (cast to this model's dtype and device)."""
        buckets = receive_buckets(self._group, refit, self._transport, reuse=True)  # copied out below
        self._copy_in(pair for bucket in buckets for pair in bucket)
        if next(self.model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()  # the last bucket is loaded before the acknowledgement (cuda_ipc frees it then)
        self.policy_version = version

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        return sequence_logprobs(self.model, prompt_ids, completion_ids, temperature).tolist()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if not self.share_weights:
            self._copy_in(named_tensors)
        self.policy_version = version

    @torch.no_grad()
    def _copy_in(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the tensors into the parameters of the same name (the adapter's alone, under PEFT's saved names, for a
        LoRA model); a tied head is one parameter. Raises if a parameter got no tensor."""
        params = adapter_parameters(self.model) if is_lora(self.model) else dict(self.model.named_parameters())
        unset = set(params)
        for name, tensor in named_tensors:
            if name in params:
                params[name].copy_(tensor)
                unset.discard(name)
        if unset:
            raise RuntimeError(f"Weight refresh left {len(unset)} parameters unset, e.g. {sorted(unset)[0]}.")
