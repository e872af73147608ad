import math

import pytest
import torch

from lightning_rlhf.losses import masked_mean, masked_sum, masked_whiten, token_logprobs


def _values_and_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    return values, mask


def test_masked_mean_and_sum_golden():
    values, mask = _values_and_mask()
    # all: (1 + 2 + 4) / 3 = 7/3; per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    assert masked_sum(values, mask).item() == pytest.approx(7.0)
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_sum(values, mask, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    # per column: (1 + 4) / 2 = 2.5, 2 / 1 = 2, nothing -> 0
    torch.testing.assert_close(masked_mean(values, mask, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_mean_float_mask_matches_bool_mask():
    values, mask = _values_and_mask()
    torch.testing.assert_close(masked_mean(values, mask.float()), masked_mean(values, mask))
    torch.testing.assert_close(masked_mean(values, mask.float(), dim=1), masked_mean(values, mask, dim=1))


def test_masked_reductions_ignore_padding_values():
    values, mask = _values_and_mask()
    poisoned = values.masked_fill(~mask, float("inf"))
    poisoned[1, 2] = float("nan")
    assert masked_mean(poisoned, mask).item() == pytest.approx(7 / 3)
    assert masked_sum(poisoned, mask).item() == pytest.approx(7.0)
    torch.testing.assert_close(masked_mean(poisoned, mask, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_empty_mask_is_zero_not_nan():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert masked_mean(values, empty).item() == 0.0
    row_empty = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masked_mean(values, row_empty, dim=1), torch.tensor([1.5, 0.0]))


def test_masked_mean_matches_loop():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=gen) > 0.4
    total, count = 0.0, 0
    for row_v, row_m in zip(values.tolist(), mask.tolist()):
        for v, m in zip(row_v, row_m):
            if m:
                total += v
                count += 1
    assert masked_mean(values, mask).item() == pytest.approx(total / count)
    assert masked_sum(values, mask).item() == pytest.approx(total)


def test_masked_reductions_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(torch.ones(2, 3), torch.ones(3))


def test_masked_whiten_golden():
    values = torch.tensor([[2.0, 6.0, 1e6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    # mean = 4, biased var = ((2-4)^2 + (6-4)^2) / 2 = 4, std = 2 -> [-1, 1], padding -> 0
    out = masked_whiten(values, mask, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]], dtype=torch.float64))
    # shift_mean=False adds the mean back: [-1 + 4, 1 + 4] = [3, 5]
    out = masked_whiten(values, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 5.0, 0.0]], dtype=torch.float64))


def test_masked_whiten_matches_loop_and_ignores_padding():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 3 + 2
    mask = torch.rand(3, 6, generator=gen) > 0.3
    eps = 1e-8
    picked = [v for rv, rm in zip(values.tolist(), mask.tolist()) for v, m in zip(rv, rm) if m]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / len(picked)
    expected = [
        [(v - mean) / math.sqrt(var + eps) if m else 0.0 for v, m in zip(rv, rm)]
        for rv, rm in zip(values.tolist(), mask.tolist())
    ]
    out = masked_whiten(values, mask, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    poisoned = values.masked_fill(~mask, 1e30)
    torch.testing.assert_close(masked_whiten(poisoned, mask, eps=eps), out)


def test_token_logprobs_golden():
    # probs softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])
    tokens = torch.tensor([[1, 1]])
    out = token_logprobs(logits, tokens)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    # temperature 2: logits / 2 = [0, ln 3 / 2] -> p(1) = sqrt3 / (1 + sqrt3)
    out = token_logprobs(logits, tokens, temperature=2.0)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(out, torch.tensor([[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]]))


def test_token_logprobs_temperature_matches_log_softmax():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    for temperature in (0.7, 1.0, 2.0):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature), expected)
    assert not torch.allclose(token_logprobs(logits, tokens, 2.0), token_logprobs(logits, tokens, 1.0))


def test_token_logprobs_matches_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, generator=gen)
    tokens = torch.randint(0, 4, (2, 3), generator=gen)
    out = token_logprobs(logits, tokens, temperature=0.5)
    for i in range(2):
        for j in range(3):
            row = [x / 0.5 for x in logits[i, j].tolist()]
            log_z = math.log(sum(math.exp(x) for x in row))
            assert out[i, j].item() == pytest.approx(row[tokens[i, j].item()] - log_z, abs=1e-5)


def test_token_logprobs_upcasts_low_precision_and_keeps_grad():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_elements", [1, 7 * 11, 2**24])  # a row at a time, two rows (and a short last), all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_in_chunks_has_the_values_and_gradients_of_the_whole_log_softmax(
    chunk_elements, dtype, monkeypatch
):
    """The hand-written backward ((onehot - softmax) / temperature, chunk by chunk) against autograd's."""
    from lightning_rlhf.losses import common

    monkeypatch.setattr(common, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(5, 7, 11, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, 11, (5, 7), generator=gen)
    weights = torch.randn(5, 7, generator=gen)  # a gradient that differs per token
    ours = logits.clone().requires_grad_()
    (token_logprobs(ours, tokens, 0.7) * weights).sum().backward()
    reference = logits.clone().requires_grad_()
    expected = torch.log_softmax(reference.float() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.7), expected.detach())
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, reference.grad)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_token_logprobs_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature)


def test_token_logprobs_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(b, t, v\)"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(b, t, v\)"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_bradley_terry_golden():
    from lightning_rlhf.losses import bradley_terry_loss

    # margins 1 and -1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    assert stats.accuracy.item() == 0.5 and stats.margin.item() == 0.0
    with pytest.raises(ValueError, match="must have the same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
