"""Generation with ``transformers``' ``generate``, in the trainer's process.

With ``share_weights=True`` (the synchronous default) the backend samples
from the training module itself, so a weight refresh is only a version bump.
In a generator process it holds its own copy and receives weights over the
side group.

Every ``generate`` call samples from its own RNG stream, seeded by ``(seed,
call index)``, so the same requests give the same samples in the trainer's
process and in a generator process, and generating never moves the trainer's
global RNG.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import GenerationConfig

from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, call_seed, truncate_at_stop
from lightning_rlhf.generation.weights import Refit, join_group, receive_buckets
from lightning_rlhf.losses import token_logprobs
from lightning_rlhf.tokens import left_pad


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """Temperature-scaled logprobs of ``completion_ids`` following ``prompt_ids`` under ``model``, (t,) on the CPU."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    logits = model(input_ids=ids).logits[:, len(prompt_ids) - 1 : -1]  # (1, t, v)
    return token_logprobs(logits, ids[:, len(prompt_ids) :], temperature)[0].cpu()


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
        completions, logprobs, reasons = [], [], []
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(call_seed(self.seed, self.calls))
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = self._generate_chunk(prompt_ids[start : start + self.batch_size], sampling)
                for part, out in zip((completions, logprobs, reasons), chunk):
                    part.extend(out)
        if sampling.temperature > 0:  # a greedy (evaluation) request draws no random numbers: streams stay as they were
            self.calls += 1
        return Generations(prompt_ids, completions, logprobs, reasons, self.policy_version, sampling.k)

    def _generate_chunk(self, prompt_ids: list[list[int]], sampling: SamplingConfig):
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.k,
            eos_token_id=sorted(self.stop_token_ids),
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        self.model.train(was_training)
        new_tokens = out.sequences[:, ids.shape[1] :]  # (n*k, t)
        logits = torch.stack(out.logits, dim=1)  # (n*k, t, v), raw (before the temperature)
        sampled_logprobs = token_logprobs(logits, new_tokens, sampling.temperature or 1.0)  # (n*k, t); greedy: unscaled
        results = [
            truncate_at_stop(t, lp, self.stop_token_ids)
            for t, lp in zip(new_tokens.tolist(), sampled_logprobs.tolist())
        ]
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    def connect(self, port: int, prefix: str, transport: str = "gloo", world_size: int = 2, timeout_s: float = 1800.0):
        self._transport = transport
        self._group = join_group(port, prefix, 1, world_size, timeout_s=timeout_s, transport=transport)

    @torch.no_grad()
    def receive_weights(self, refit: Refit, version: int) -> None:
        """Copy each bucket into the parameters as it arrives (cast to this model's dtype and device)."""
        params = dict(self.model.named_parameters())
        unset = set(params)
        for bucket in receive_buckets(self._group, refit, self._transport, reuse=True):  # copied out below
            for name, tensor in bucket:
                if name in params:
                    params[name].copy_(tensor)
                    unset.discard(name)
        if unset:
            raise RuntimeError(f"Weight refresh left {len(unset)} parameters unset, e.g. {sorted(unset)[0]}.")
        if next(self.model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()  # the last bucket is loaded before the acknowledgement (cuda_ipc frees it then)
        self.policy_version = version

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        return sequence_logprobs(self.model, prompt_ids, completion_ids, temperature).tolist()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if not self.share_weights:
            state = dict(named_tensors)
            missing, _ = self.model.load_state_dict(state, strict=False)
            if missing and any(not name.endswith("lm_head.weight") for name in missing):
                raise RuntimeError(f"Weight refresh left {len(missing)} parameters unset, e.g. {missing[0]}.")
        self.policy_version = version
