"""Each recipe's ``update`` learns the same with ``micro_batch_size`` as with the whole batch (in process).

The batch is made up (random completions of different lengths, random scores), the policy is the built-in
SFT model and PPO's critic the built-in reward model; plain SGD, so the parameters after the step are the
gradient itself (Adam's first step is about ``lr * sign(gradient)`` and would hide a wrongly weighted one).
The micro-batches are uneven, so a mean of micro-batch means would differ from the batch's loss.
"""

import copy
import importlib
import os
import sys

import lightning as L
import pytest
import torch

from lightning_rlhf.generation import Generations
from lightning_rlhf.models import load_reward_model
from lightning_rlhf.rollout_batch import build_rollout_batch

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


@pytest.fixture(scope="module")
def recipes():
    """The recipe scripts as modules (they import their sibling ``shared``), and ``shared`` itself."""
    sys.path.insert(0, RECIPES)
    try:
        return {name: importlib.import_module(name) for name in ("shared", "online_dpo", "rloo", "ppo")}
    finally:
        sys.path.remove(RECIPES)


@pytest.fixture(scope="module")
def fabric():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


def scored_batch(shared, tokenizer, n: int, k: int, seed: int = 0):
    """``n`` prompts with ``k`` random completions each, 1 to 6 tokens long, and random scores."""
    g = torch.Generator().manual_seed(seed)
    vocab = range(4, len(tokenizer))  # past the special tokens

    def tokens(length: int) -> list[int]:
        return [vocab[int(i)] for i in torch.randint(len(vocab), (length,), generator=g)]

    prompts = [tokens(int(torch.randint(2, 6, (), generator=g))) for _ in range(n)]
    completions = [tokens(int(torch.randint(1, 7, (), generator=g))) for _ in range(n * k)]
    generations = Generations(
        prompt_ids=prompts,
        completion_ids=completions,
        behavior_logprobs=[[0.0] * len(c) for c in completions],
        finish_reasons=["length"] * (n * k),
        policy_version=0,
        k=k,
    )
    rollouts = build_rollout_batch(generations, tokenizer.pad_token_id)
    return shared.ScoredBatch([{"prompt": str(p)} for p in prompts], rollouts, torch.randn(n * k, generator=g), 0)


def one_update(shared, fabric, policy, ref_policy, micro_batch_size, k, update, *modules):
    """Copies of ``policy`` (and ``modules``) after ``update(learner, *module copies)`` with SGD; their parameters."""
    policy, modules = copy.deepcopy(policy), [copy.deepcopy(m) for m in modules]
    params = [p for m in (policy, *modules) for p in m.parameters()]
    optimizer = fabric.setup_optimizers(torch.optim.SGD(params, lr=0.1))
    wrapped = [fabric.setup_module(m) for m in (policy, *modules)]
    train, rollout = shared.TrainArgs(micro_batch_size=micro_batch_size), shared.RolloutArgs(k=k)
    metrics = update(shared.Learner(fabric, wrapped[0], ref_policy, optimizer, train, rollout), *wrapped[1:])
    return [p.detach().clone() for p in params], metrics


@pytest.mark.parametrize(
    "recipe, k, micro_batch_size, hyper_parameters",
    [
        ("online_dpo", 4, 4, {"beta": 0.1}),  # 3 pairs: 2 + 1 per pass
        ("rloo", 4, 5, {"kl_coef": 0.05, "clip_eps": 0.2}),  # 12 sequences: 5 + 5 + 2
        ("ppo", 2, 4, {"num_epochs": 1, "kl_coef": 0.05, "clip_eps": 0.2, "vf_coef": 0.1, "lam": 0.95}),  # 4 + 2
    ],
)
def test_micro_batches_give_the_whole_batch_update(recipes, fabric, recipe, k, micro_batch_size, hyper_parameters):
    shared, module = recipes["shared"], recipes[recipe]
    tokenizer, policy, ref_policy = shared.load_models(fabric, shared.RunArgs())
    batch = scored_batch(shared, tokenizer, n=3, k=k)
    critic = [load_reward_model("builtin:reward_model").train()] if recipe == "ppo" else []

    def update(learner, *critic):
        return module.update(learner, *critic, batch, **hyper_parameters)

    before = [p.detach().clone() for m in (policy, *critic) for p in m.parameters()]
    whole, whole_metrics = one_update(shared, fabric, policy, ref_policy, None, k, update, *critic)
    micro, micro_metrics = one_update(shared, fabric, policy, ref_policy, micro_batch_size, k, update, *critic)

    assert any(not torch.equal(b, w) for b, w in zip(before, whole))  # the step moved the parameters
    for w, m in zip(whole, micro):
        torch.testing.assert_close(m, w, rtol=1e-4, atol=1e-6)
    for name in whole_metrics:
        torch.testing.assert_close(micro_metrics[name], whole_metrics[name], rtol=1e-4, atol=1e-6)
