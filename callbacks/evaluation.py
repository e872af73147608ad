"""Gold evaluation: win rate against reference completions and KL to the reference (SFT) policy.

The paper's protocol (Noukhovitch et al. 2025, Sec. 3, after Gao et al. 2023):
sample one completion per held-out prompt, let the *gold* reward judge it
against the reference completion, and report the win rate together with the
KL divergence to the SFT policy, estimated on the same samples as the mean
over completions of the summed per-token ``log pi - log pi_ref`` (k1).
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_rlhf.contracts import RLModule
from lightning_rlhf.data.datamodules import load_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.metrics import GoldWinRate
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.rollout_batch import build_rollout_batch, response_logprobs
from lightning_rlhf.tokens import prompt_token_ids


@torch.no_grad()
def evaluate_policy(
    policy,
    ref_policy,
    tokenizer,
    gold: RewardFunction,
    rows: list[dict],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int = 128,
) -> dict[str, float]:
    """Gold win rate, mean gold score, eos rate and KL to ``ref_policy`` on one sample per row.

    Sampling uses its own seeded RNG stream, so evaluating does not change the training run.
    """
    sampling = SamplingConfig(k=1, temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens)
    backend = TransformersBackend(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_size=batch_size)
    win_rate, scores, kls, finished = GoldWinRate(), [], [], []
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [r["prompt"] for r in chunk]
            generations = backend.generate(prompt_token_ids(tokenizer, prompts), sampling)
            completions = tokenizer.batch_decode(generations.completion_ids, skip_special_tokens=True)
            policy_scores = gold(prompts, completions, chunk).float().cpu()
            reference_scores = gold(prompts, [r["reference"] for r in chunk], chunk).float().cpu()
            win_rate.update(policy_scores, reference_scores)
            rollouts = build_rollout_batch(generations, tokenizer.pad_token_id).to(device)
            logps = response_logprobs(policy, rollouts, sampling.temperature).sum(-1)
            ref_logps = response_logprobs(ref_policy, rollouts, sampling.temperature).sum(-1)
            kls.append((logps - ref_logps).cpu())
            scores.append(policy_scores)
            finished.append(rollouts.finished.float().cpu())
    return {
        "eval/gold_win_rate": win_rate.compute().item(),
        "eval/gold_score": torch.cat(scores).mean().item(),
        "eval/kl": torch.cat(kls).mean().item(),
        "eval/eos_rate": torch.cat(finished).mean().item(),
    }


class GoldEvaluation(Callback):
    """Evaluate before the first update, every ``every_n_steps`` optimizer steps, and at the end.

    Metrics go to every logger (``eval/gold_win_rate``, ``eval/gold_score``, ``eval/kl``,
    ``eval/eos_rate``); the first and last are printed and written to
    ``eval_summary.json`` in the run's log folder. The LightningModule is
    an :class:`~lightning_rlhf.contracts.RLModule` (its ``policy``, ``ref_policy``,
    ``tokenizer`` and ``sampling`` are read).

    Args:
        gold: The gold reward, e.g. the built-in task's ``lightning_rlhf.tasks.copy.CopyGoldReward``.
        dataset: Held-out prompts with reference completions.
        prompt_column: Column with the prompt text.
        reference_column: Column with the reference completion.
        num_prompts: How many prompts to evaluate (the first ones).
        every_n_steps: Also evaluate every this many optimizer steps; ``None`` for only start and end.
        seed: Seed of the evaluation samples (the same prompts and noise each time).

    Raises:
        ConfigError: If the dataset lacks one of the columns.
    """

    def __init__(
        self,
        gold: RewardFunction,
        dataset: str = "builtin:eval_prompts",
        prompt_column: str = "prompt",
        reference_column: str = "reference",
        num_prompts: int = 256,
        every_n_steps: int | None = None,
        seed: int = 1234,
    ) -> None:
        rows = load_rows(dataset)
        for key, column in (("prompt", prompt_column), ("reference", reference_column)):
            if column not in rows.column_names:
                raise ConfigError(
                    f"Evaluation dataset '{dataset}' has no column '{column}' (columns: {', '.join(rows.column_names)}); set `{key}_column`."
                )
        rows = rows.select(range(min(num_prompts, len(rows))))
        self.rows = [{**r, "prompt": r[prompt_column], "reference": r[reference_column]} for r in rows]
        self.gold = gold
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.history: list[dict[str, float]] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, RLModule):
            raise ConfigError(
                f"GoldEvaluation evaluates a policy trained by an RL module (OnlineDPO, RLOO, PPO), not {type(pl_module).__name__}; drop the callback."
            )

    def _run(self, trainer: L.Trainer, module: RLModule) -> dict[str, float]:
        metrics = evaluate_policy(
            module.policy, module.ref_policy, module.tokenizer, self.gold, self.rows, module.sampling, self.seed
        )
        metrics["step"] = trainer.global_step
        self.history.append(metrics)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=trainer.global_step)
            logger.save()
        return metrics

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # a generated batch may advance several optimizer steps: evaluate when a multiple is crossed
        last = self.history[-1]["step"] if self.history else 0
        crossed = self.every_n_steps and trainer.global_step // self.every_n_steps > last // self.every_n_steps
        if crossed and not (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps):
            self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._run(trainer, pl_module)
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        first, last = self.history[0], self.history[-1]
        summary = {"before": first, "after": last, "history": self.history}
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "eval_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"gold win rate: {first['eval/gold_win_rate']:.3f} (step {first['step']}) -> {last['eval/gold_win_rate']:.3f} "
            f"(step {last['step']}); KL to reference: {first['eval/kl']:.3f} -> {last['eval/kl']:.3f}; "
            f"summary: {os.path.join(folder, 'eval_summary.json')}"
        )

    @override
    def state_dict(self) -> dict:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
