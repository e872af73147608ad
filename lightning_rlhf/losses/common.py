"""Masked reductions and token log-probabilities shared by the RLHF losses.

Notation:
    b: batch size (number of sequences).
    t: response length in tokens (right-padded; ``mask`` is 1 on real tokens).
    v: vocabulary size.

Source:
    Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025), reference code
    github.com/mnoukhov/async_rlhf (a fork of TRL 0.11). ``masked_mean`` and
    ``masked_whiten`` follow ``trl.core``; ``token_logprobs`` follows the
    trainers' ``logits /= args.temperature + 1e-7`` followed by a log-softmax
    gather.

Deviations:
    - ``masked_mean`` clamps the denominator to at least 1, so an all-zero mask
      gives 0 instead of NaN.
    - ``masked_whiten`` uses the biased (``unbiased=False``) variance; TRL 0.11
      applies Bessel's correction. The difference is a factor of
      ``sqrt(n / (n - 1))`` and vanishes for large batches. It also zeroes
      masked-out positions, which TRL leaves as whitened padding.
    - ``token_logprobs`` divides by ``temperature`` exactly (no ``+ 1e-7``) and
      rejects ``temperature <= 0`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_mask(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but mask has shape {tuple(mask.shape)}; "
            "pass a mask with the same shape as values."
        )


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sums ``values`` where ``mask`` is 1.

    Args:
        values: Tensor of any shape.
        mask: Bool or 0/1 float tensor with the same shape as ``values``.
        dim: Dimension to reduce; ``None`` reduces over all elements.

    Returns:
        The masked sum, reduced over ``dim``. Masked-out entries never
        contribute, even if they are ``inf`` or ``nan``.

    Raises:
        ValueError: If ``values`` and ``mask`` have different shapes.
    """
    _check_mask(values, mask)
    # torch.where (not values * mask) so that inf/nan padding cannot leak.
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Averages ``values`` over the entries where ``mask`` is 1.

    Args:
        values: Tensor of any shape.
        mask: Bool or 0/1 float tensor with the same shape as ``values``.
        dim: Dimension to reduce; ``None`` reduces over all elements.

    Returns:
        The masked mean, reduced over ``dim``. Where the mask is empty the
        result is 0 (the denominator is clamped to at least 1).

    Raises:
        ValueError: If ``values`` and ``mask`` have different shapes.
    """
    total = masked_sum(values, mask, dim)
    count = mask.to(total.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalises ``values`` to zero mean and unit variance over masked entries.

    Computes ``(x - mean) / sqrt(var + eps)`` with the mean and biased
    (``unbiased=False``) variance taken over all entries where ``mask`` is 1.

    Args:
        values: Tensor of any shape.
        mask: Bool or 0/1 float tensor with the same shape as ``values``.
        shift_mean: If False, the mean is added back after scaling (as TRL does),
            so only the scale is normalised.
        eps: Added to the variance for numerical stability.

    Returns:
        Tensor shaped like ``values``; masked-out positions are 0.

    Raises:
        ValueError: If ``values`` and ``mask`` have different shapes.
    """
    mean = masked_mean(values, mask)  # ()
    var = masked_mean((values - mean) ** 2, mask)  # (), biased
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# Elements of (rows x positions x vocabulary) upcast to float32 at once in token_logprobs: 2**24 is 64 MiB, a
# TL;DR row (~565 positions x 50k vocabulary) at a time; the built-in task's whole batch at once.
LOGPROB_CHUNK_ELEMENTS = 2**24


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    Never holds a float32 copy of the whole (b, t, v) logits: rows are upcast, scaled
    and reduced a chunk at a time (at most :data:`LOGPROB_CHUNK_ELEMENTS` elements),
    and only the log-partition function (b, t) is kept for the backward, which
    recomputes each chunk's softmax (the gradient of ``x_y - logsumexp(x)`` is
    ``onehot(y) - softmax(x)``). The autograd graph holds the logits in their own
    dtype (bf16: half of a float32 copy) and one chunk's float32 scratch at a time;
    TRL's ``selective_log_softmax`` loops over rows for the same reason.

    Args:
        logits: Float tensor of shape (b, t, v), already aligned so that
            ``logits[:, i]`` predicts ``tokens[:, i]``.
        tokens: Long tensor of shape (b, t).
        temperature: Sampling temperature the tokens were generated with.

    Returns:
        Float32 tensor of shape (b, t) (logits are upcast before the
        log-sum-exp so bf16/fp16 models stay accurate).

    Raises:
        ValueError: If ``temperature <= 0`` or the shapes do not line up.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; pass a positive temperature.")
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match; "
            "pass logits of shape (b, t, v) and tokens of shape (b, t)."
        )
    return _TokenLogprobs.apply(logits, tokens.long(), temperature)


def _row_chunks(logits: Tensor) -> list[slice]:
    b, t, v = logits.shape
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, t * v))
    return [slice(start, start + rows) for start in range(0, b, rows)]


class _TokenLogprobs(torch.autograd.Function):
    """``x_y - logsumexp(x)`` with ``x = logits / temperature`` in float32, chunk by chunk of rows."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
        picked = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # (b, t)
        log_partition = torch.empty_like(picked)  # (b, t)
        for rows in _row_chunks(logits):
            x = logits[rows].float() / temperature  # (r, t, v); upcast bf16/fp16 before logsumexp
            picked[rows] = torch.gather(x, -1, tokens[rows].unsqueeze(-1)).squeeze(-1)
            log_partition[rows] = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, tokens, log_partition)
        ctx.temperature = temperature
        return picked - log_partition

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, tokens, log_partition = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (b, t, v), in the logits' dtype
        for rows in _row_chunks(logits):
            g = grad[rows].unsqueeze(-1)  # (r, t, 1)
            softmax = torch.exp(logits[rows].float() / ctx.temperature - log_partition[rows].unsqueeze(-1))
            chunk = (-softmax * g).scatter_add_(-1, tokens[rows].unsqueeze(-1), g)  # (onehot - softmax) * grad
            grad_logits[rows] = chunk / ctx.temperature
        return grad_logits, None, None
