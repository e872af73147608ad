import math

import pytest
import torch

from lightning_rlhf.losses import GRPOStats, group_advantages, grpo_loss

F64 = torch.float64


def test_group_advantages_golden():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=F64)
    # row 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1            -> (-1, 0, 1) / (1 + 1e-4)
    # row 1: mean 2, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)    -> (-2, -2, 4) / (sqrt(12) + 1e-4)
    expected = torch.tensor(
        [
            [-1 / 1.0001, 0.0, 1 / 1.0001],
            [-2 / (math.sqrt(12) + 1e-4), -2 / (math.sqrt(12) + 1e-4), 4 / (12**0.5 + 1e-4)],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(group_advantages(rewards), expected)
    # Dr. GRPO: only centred
    torch.testing.assert_close(
        group_advantages(rewards, scale_rewards=False), torch.tensor([[-1.0, 0, 1], [-2, -2, 4]], dtype=F64)
    )


def test_group_advantages_of_equal_rewards_are_zero_and_each_row_sums_to_zero():
    torch.testing.assert_close(group_advantages(torch.full((2, 4), 3.0)), torch.zeros(2, 4))
    adv = group_advantages(torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    torch.testing.assert_close(adv.sum(1), torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("shape", [(4,), (3, 1), (2, 3, 4)])
def test_group_advantages_refuse_a_shape_without_groups(shape):
    with pytest.raises(ValueError, match=r"\(b, k\) with k >= 2"):
        group_advantages(torch.ones(shape))


def _case():
    # two responses, three positions; response 0 has 2 real tokens, response 1 has 1; ratio 1 everywhere
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -1.0]], dtype=F64, requires_grad=True)
    old = logprobs.detach().clone()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -3.0], dtype=F64)
    return logprobs, old, advantages, mask


@pytest.mark.parametrize(
    ("aggregation", "max_tokens", "expected"),
    [
        # per-token loss at ratio 1 is -A: response 0 -> (-1, -1), response 1 -> (3)
        ("sequence_mean", None, (-1.0 + 3.0) / 2),  # mean of each response's mean: (-1, 3) -> 1.0
        ("token_mean", None, (-1.0 - 1.0 + 3.0) / 3),  # one mean over the 3 real tokens -> 1/3
        ("sequence_sum_constant", None, (-1.0 - 1.0 + 3.0) / (2 * 3)),  # sum / (b * t) -> 1/6
        ("sequence_sum_constant", 4, (-1.0 - 1.0 + 3.0) / (2 * 4)),  # sum / (b * max_tokens) -> 1/8
    ],
)
def test_each_aggregation_golden(aggregation, max_tokens, expected):
    logprobs, old, advantages, mask = _case()
    loss, stats = grpo_loss(logprobs, old, advantages, mask, 0.2, aggregation, max_tokens=max_tokens)
    assert loss.item() == pytest.approx(expected)
    assert isinstance(stats, GRPOStats) and stats.ratio.item() == pytest.approx(1.0) and stats.kl.item() == 0.0
    # the gradient of the loss for a token of response i is -A_i times that token's weight in the aggregation
    loss.backward()
    token_weight = {
        "sequence_mean": torch.tensor([[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]], dtype=F64),  # 1 / (b * len_i)
        "token_mean": torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]], dtype=F64),  # 1 / tokens
        "sequence_sum_constant": torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64) / (2 * (max_tokens or 3)),
    }[aggregation]
    torch.testing.assert_close(logprobs.grad, -advantages[:, None] * token_weight)


def test_the_ratio_is_clipped_as_ppo_and_the_kl_term_is_k3():
    # eps 0.2, one response of four tokens, advantages per response so four responses of one token each:
    # ratio 1.5, A +1: -1.5 vs -1.2 -> -1.2 (clipped); ratio 0.5, A +1: -0.5 vs -0.8 -> -0.5;
    # ratio 0.5, A -1: 0.5 vs 0.8 -> 0.8 (clipped);    ratio 1.5, A -1: 1.5 vs 1.2 -> 1.5
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]], dtype=F64)
    old = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]], dtype=F64)
    logprobs = old + ratios.log()
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)
    mask = torch.ones(4, 1)
    loss, stats = grpo_loss(logprobs, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    # k3 with pi_ref / pi = 1/2 on every token: 0.5 - log(0.5) - 1 = 0.19315, weighted by kl_coef 0.1
    ref = logprobs + math.log(0.5)
    loss_kl, stats_kl = grpo_loss(logprobs, old, advantages, mask, 0.2, ref_logprobs=ref, kl_coef=0.1)
    k3 = 0.5 - math.log(0.5) - 1
    assert stats_kl.kl.item() == pytest.approx(k3)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1 * k3)


def _reference(logprobs, old, advantages, mask, eps, aggregation, ref, kl_coef, weights, max_tokens):
    """GRPO's loss written token by token from the papers' formulas, independent of the vectorized code."""
    per_response, tokens, total = [], 0, 0.0
    for i in range(len(logprobs)):
        terms = []
        for j in range(len(logprobs[i])):
            if not mask[i][j]:
                continue
            ratio = math.exp(logprobs[i][j] - old[i][j])
            a = advantages[i]
            term = max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
            if weights is not None:
                term *= weights[i][j]
            if ref is not None:
                log_r = ref[i][j] - logprobs[i][j]
                term += kl_coef * (math.exp(log_r) - log_r - 1)
            terms.append(term)
        per_response.append(sum(terms) / max(len(terms), 1))
        tokens += len(terms)
        total += sum(terms)
    if aggregation == "sequence_mean":
        return sum(per_response) / len(per_response)
    if aggregation == "token_mean":
        return total / tokens
    return total / (len(logprobs) * max_tokens)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "sequence_sum_constant"])
@pytest.mark.parametrize("with_kl_and_weights", [False, True])
def test_matches_a_token_by_token_reference(aggregation, with_kl_and_weights):
    gen = torch.Generator().manual_seed(3)
    b, t = 6, 5
    old = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    logprobs = old + torch.randn(b, t, generator=gen, dtype=F64) * 0.3  # ratios on both sides of the clip
    advantages = torch.randn(b, generator=gen, dtype=F64)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ref = old - torch.rand(b, t, generator=gen, dtype=F64) if with_kl_and_weights else None
    weights = torch.rand(b, t, generator=gen, dtype=F64) * 2 if with_kl_and_weights else None
    loss, _ = grpo_loss(logprobs, old, advantages, mask, 0.2, aggregation, ref, 0.3, weights, max_tokens=7)
    expected = _reference(
        logprobs.tolist(),
        old.tolist(),
        advantages.tolist(),
        mask.tolist(),
        0.2,
        aggregation,
        None if ref is None else ref.tolist(),
        0.3,
        None if weights is None else weights.tolist(),
        7,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_bad_input_is_one_clear_sentence():
    logprobs, old, advantages, mask = _case()
    with pytest.raises(ValueError, match="aggregation must be one of"):
        grpo_loss(logprobs, old, advantages, mask, 0.2, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"advantages \(b,\)"):
        grpo_loss(logprobs, old, advantages[:1], mask, 0.2)
