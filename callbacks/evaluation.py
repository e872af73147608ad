"""Evaluation callbacks: gold win rate with KL (TL;DR, chat) and exact-match accuracy (GSM8k, arithmetic).

Both evaluate before the first update, every ``every_n_steps`` optimizer steps,
and at the end; log ``eval/...`` metrics to every logger; print the first and
last; and write ``eval_summary.json`` (before, after, history) into the run's
log folder.

* :class:`GoldEvaluation`, the paper's protocol (Noukhovitch et al. 2025,
  Sec. 3, after Gao et al. 2023): sample one completion per held-out prompt,
  let the *gold* reward (or any :class:`~lightning_rlhf.callbacks.judges.Judge`)
  judge it against the reference completion, and report the win rate with the
  KL divergence to the SFT policy, estimated on the same samples as the mean
  over completions of the summed per-token ``log pi - log pi_ref`` (k1).
* :class:`AccuracyEvaluation`, the paper's GSM8k evaluation (Sec. 5.2; its
  code decodes greedily on the test split): the share of held-out problems
  whose ``#### <number>`` equals the reference answer, logged as ``eval/accuracy``.
  Greedy completions come from the training's generator (vLLM when installed),
  refreshed to the current weights first; a greedy request draws no random
  numbers, so training samples the same with or without it.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_rlhf.callbacks.judges import Judge
from lightning_rlhf.contracts import RLModule
from lightning_rlhf.data.datamodules import adapt_prompt, load_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import Generations, SamplingConfig, TransformersBackend
from lightning_rlhf.metrics import GoldWinRate
from lightning_rlhf.models import stop_token_ids
from lightning_rlhf.rewards import GSM8kExactMatch, RewardFunction, extract_gsm8k_answer
from lightning_rlhf.rollout_batch import build_rollout_batch
from lightning_rlhf.rollout_forwards import response_logprobs
from lightning_rlhf.tokens import prompt_token_ids


@torch.no_grad()
def evaluate_policy(
    policy,
    ref_policy,
    tokenizer,
    gold: RewardFunction | Judge,
    rows: list[dict],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int = 128,
) -> dict[str, float]:
    """Gold win rate, mean gold score, eos rate, response length and KL to ``ref_policy`` on one sample per row.

    Sampling uses its own seeded RNG stream, so evaluating does not change the training run.
    ``gold`` is a reward (the policy wins where it scores above the reference) or a
    :class:`~lightning_rlhf.callbacks.judges.Judge`.
    """
    sampling = SamplingConfig(k=1, temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens)
    backend = TransformersBackend(
        policy, stop_token_ids(tokenizer, policy), tokenizer.pad_token_id, batch_size=batch_size
    )
    win_rate, scores, kls, finished, lengths = GoldWinRate(), [], [], [], []
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [r["prompt"] for r in chunk]
            generations = backend.generate(prompt_token_ids(tokenizer, prompts), sampling)
            completions = tokenizer.batch_decode(generations.completion_ids, skip_special_tokens=True)
            references = [r["reference"] for r in chunk]
            if isinstance(gold, Judge):  # outcomes 1 / 0.5 / 0 against the reference's 0.5
                policy_scores = gold(prompts, completions, references, chunk).float().cpu()
                reference_scores = torch.full_like(policy_scores, 0.5)
            else:
                policy_scores = gold(prompts, completions, chunk).float().cpu()
                reference_scores = gold(prompts, references, chunk).float().cpu()
            win_rate.update(policy_scores, reference_scores)
            rollouts = build_rollout_batch(generations, tokenizer.pad_token_id).to(device)
            # one sample per prompt (k=1 above): no prompt to share
            logps = response_logprobs(policy, rollouts, sampling.temperature, share_prompts=False).sum(-1)
            ref_logps = response_logprobs(ref_policy, rollouts, sampling.temperature, share_prompts=False).sum(-1)
            kls.append((logps - ref_logps).cpu())
            scores.append(policy_scores)
            finished.append(rollouts.finished.float().cpu())
            lengths.append(rollouts.response_mask.sum(-1).float().cpu())
    metrics = {
        "eval/gold_win_rate": win_rate.compute().item(),
        "eval/gold_score": torch.cat(scores).mean().item(),
        "eval/kl": torch.cat(kls).mean().item(),
        "eval/eos_rate": torch.cat(finished).mean().item(),
        "eval/response_length": torch.cat(lengths).mean().item(),
    }
    if isinstance(gold, Judge):
        del metrics["eval/gold_score"]  # the judge's outcomes are the win rate itself
    return metrics


def load_eval_rows(
    dataset: str, split: str, columns: dict[str, str], num_prompts: int | None, template: str | None = None
) -> list[dict]:
    """The first ``num_prompts`` rows of ``dataset``'s ``split``, adapted like training prompts, with canonical keys.

    Raises:
        ConfigError: If a column is missing.
    """
    rows = load_rows(dataset, split)
    conversation = len(rows) and "reference" in adapt_prompt({"prompt": rows[0].get(columns["prompt"])})
    if columns.get("reference") not in rows.column_names and conversation:  # its last turn is the reference
        columns = {k: c for k, c in columns.items() if k != "reference"}
    for key, column in columns.items():
        if column not in rows.column_names:
            raise ConfigError(
                f"Evaluation dataset '{dataset}' has no column '{column}' (columns: {', '.join(rows.column_names)}); "
                f"set `{key}_column`."
            )
    rows = rows.select(range(min(num_prompts or len(rows), len(rows))))
    prompt_column = columns["prompt"]
    renamed = [{**r, **{key: r[column] for key, column in columns.items()}} for r in rows]
    return [adapt_prompt(r, template, prompt_column) for r in renamed]


def greedy_completions(module: RLModule, prompts: list, max_new_tokens: int, batch_size: int) -> Generations:
    """One greedy completion per prompt from the current policy: on the training's generator when it has one.

    The rollout source refreshes its generator to ``module.policy_version`` first
    (:meth:`~lightning_rlhf.generation.source.RolloutSource.evaluate`); without
    one (in-process sampling, a shared generator) the policy generates here.
    """
    sampling = SamplingConfig(k=1, temperature=0.0, max_new_tokens=max_new_tokens)
    prompt_ids = prompt_token_ids(module.tokenizer, prompts)
    source = module.rollout_source
    generations = source.evaluate(prompt_ids, sampling, module.policy_version) if source is not None else None
    if generations is None:
        tokenizer = module.tokenizer
        backend = TransformersBackend(
            module.policy, stop_token_ids(tokenizer, module.policy), tokenizer.pad_token_id, batch_size=batch_size
        )
        generations = backend.generate(prompt_ids, sampling)
    return generations


class _Evaluation(Callback):
    """When to evaluate, where the results go; subclasses measure (:meth:`measure`) and summarise (:meth:`describe`)."""

    def __init__(self, every_n_steps: int | None) -> None:
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []

    def measure(self, trainer: L.Trainer, module: RLModule) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, first: dict[str, float], last: dict[str, float]) -> str:
        raise NotImplementedError

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, RLModule):
            raise ConfigError(
                f"{type(self).__name__} evaluates a policy trained by an RL module (OnlineDPO, RLOO, PPO), "
                f"not {type(pl_module).__name__}; drop the callback."
            )

    def _run(self, trainer: L.Trainer, module: RLModule) -> dict[str, float]:
        metrics = self.measure(trainer, module)
        metrics["step"] = trainer.global_step
        self.history.append(metrics)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=trainer.global_step)
            logger.save()
        return metrics

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:  # a resumed run keeps its first evaluation
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
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "eval_summary.json")
        with open(path, "w") as f:
            json.dump({"before": first, "after": last, "history": self.history}, f, indent=2)
        print(f"{self.describe(first, last)}; summary: {path}")

    @override
    def state_dict(self) -> dict:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class GoldEvaluation(_Evaluation):
    """Gold win rate against reference completions, with KL to the reference policy
    (the paper's TL;DR and chat protocol).

    Metrics (``eval/gold_win_rate``, ``eval/gold_score``, ``eval/kl``, ``eval/eos_rate``,
    ``eval/response_length``) go to every logger and to ``eval_summary.json`` (see the
    module docstring). The LightningModule is an :class:`~lightning_rlhf.contracts.RLModule`
    (its ``policy``, ``ref_policy``, ``tokenizer`` and ``sampling`` are read).

    Args:
        gold: The gold reward, e.g. the built-in task's ``lightning_rlhf.tasks.copy.CopyGoldReward``
            or the paper's gold reward model (a ``RewardModelScore``).
        judge: Instead of ``gold``, a :class:`~lightning_rlhf.callbacks.judges.Judge` that compares
            each completion with the reference (a local reward model or judge LLM, or your API judge).
        dataset: Held-out prompts with reference completions (a conversation's last assistant
            turn is its reference).
        split: Split of a hub dataset or folder, e.g. ``"validation"`` or ``"test"``.
        prompt_column: Column with the prompt (text or a conversation).
        reference_column: Column with the reference completion.
        prompt_template: As the data module's, so prompts are those of training.
        num_prompts: How many prompts to evaluate (the first ones).
        every_n_steps: Also evaluate every this many optimizer steps; ``None`` for only start and end.
        seed: Seed of the evaluation samples (the same prompts and noise each time).

    Raises:
        ConfigError: If the dataset lacks one of the columns, or not exactly one of ``gold`` and ``judge`` is given.
    """

    def __init__(
        self,
        gold: RewardFunction | None = None,
        judge: Judge | None = None,
        dataset: str = "builtin:eval_prompts",
        split: str = "train",
        prompt_column: str = "prompt",
        reference_column: str = "reference",
        prompt_template: str | None = None,
        num_prompts: int = 256,
        every_n_steps: int | None = None,
        seed: int = 1234,
    ) -> None:
        super().__init__(every_n_steps)
        if (gold is None) == (judge is None):
            raise ConfigError("GoldEvaluation needs exactly one of `gold` (a reward) and `judge` (a Judge).")
        columns = {"prompt": prompt_column, "reference": reference_column}
        self.rows = load_eval_rows(dataset, split, columns, num_prompts, prompt_template)
        scorer = gold if gold is not None else judge
        assert scorer is not None  # exactly one was given (checked above)
        self.gold: RewardFunction | Judge = scorer
        self.seed = seed

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.gold.setup(pl_module.device)

    @override
    def measure(self, trainer: L.Trainer, module: RLModule) -> dict[str, float]:
        return evaluate_policy(
            module.policy, module.ref_policy, module.tokenizer, self.gold, self.rows, module.sampling, self.seed
        )

    @override
    def describe(self, first: dict[str, float], last: dict[str, float]) -> str:
        return (
            f"gold win rate: {first['eval/gold_win_rate']:.3f} (step {first['step']}) "
            f"-> {last['eval/gold_win_rate']:.3f} (step {last['step']}); "
            f"KL to reference: {first['eval/kl']:.3f} -> {last['eval/kl']:.3f}"
        )


class AccuracyEvaluation(_Evaluation):
    """Exact-match accuracy of greedy answers on held-out problems (the paper's GSM8k metric, ``eval/accuracy``).

    Logs ``eval/accuracy`` (the ``#### <number>`` equals the reference answer's),
    ``eval/format_rate`` (a ``#### <number>`` is there at all, right or wrong),
    ``eval/eos_rate`` and ``eval/response_length``; with ``sampled=True`` also
    ``eval/accuracy_sampled``, one sample per problem at the training temperature,
    drawn in the trainer's process from its own seeded stream. See the module docstring.

    Args:
        dataset: Held-out problems, e.g. ``openai/gsm8k:main`` (split ``test``) or ``builtin:arithmetic_eval``.
        split: Split of a hub dataset or folder.
        prompt_column: Column with the problem (text or a conversation).
        answer_column: Column with the reference answer (GSM8k's solution ending ``#### n``, or a number).
        prompt_template: As the data module's, e.g. ``"[MATH_TASK] Problem:\\n{question}\\n\\nSolution:"``.
        num_prompts: How many problems (the first ones); ``None`` for all.
        max_new_tokens: Longest answer; default: the module's ``max_new_tokens``.
        every_n_steps: Also evaluate every this many optimizer steps; ``None`` for only start and end.
        sampled: Also measure accuracy at the training temperature.
        batch_size: Prompts per generation batch when the policy generates in this process.
        seed: Seed of the sampled evaluation.

    Raises:
        ConfigError: If the dataset lacks one of the columns.
    """

    def __init__(
        self,
        dataset: str,
        split: str = "test",
        prompt_column: str = "question",
        answer_column: str = "answer",
        prompt_template: str | None = None,
        num_prompts: int | None = None,
        max_new_tokens: int | None = None,
        every_n_steps: int | None = None,
        sampled: bool = False,
        batch_size: int = 64,
        seed: int = 1234,
    ) -> None:
        super().__init__(every_n_steps)
        columns = {"prompt": prompt_column, "answer": answer_column}
        self.rows = load_eval_rows(dataset, split, columns, num_prompts, prompt_template)
        self.max_new_tokens = max_new_tokens
        self.sampled = sampled
        self.batch_size = batch_size
        self.seed = seed

    def _score(self, module: RLModule, generations: Generations) -> tuple[list[bool], list[bool]]:
        texts = module.tokenizer.batch_decode(generations.completion_ids, skip_special_tokens=True)
        found = [extract_gsm8k_answer(t) for t in texts]
        correct = GSM8kExactMatch("answer")([r["prompt"] for r in self.rows], texts, self.rows)
        return [f is not None for f in found], correct.bool().tolist()

    @override
    def measure(self, trainer: L.Trainer, module: RLModule) -> dict[str, float]:
        max_new_tokens = self.max_new_tokens or module.sampling.max_new_tokens
        prompts = [r["prompt"] for r in self.rows]
        generations = greedy_completions(module, prompts, max_new_tokens, self.batch_size)
        formatted, correct = self._score(module, generations)
        metrics = {
            "eval/accuracy": sum(correct) / len(correct),
            "eval/format_rate": sum(formatted) / len(formatted),
            "eval/eos_rate": sum(r == "stop" for r in generations.finish_reasons) / len(correct),
            "eval/response_length": sum(map(len, generations.completion_ids)) / len(correct),
        }
        if self.sampled:
            tokenizer = module.tokenizer
            backend = TransformersBackend(
                module.policy,
                stop_token_ids(tokenizer, module.policy),
                tokenizer.pad_token_id,
                batch_size=self.batch_size,
                seed=self.seed,
            )
            sampling = SamplingConfig(k=1, temperature=module.sampling.temperature, max_new_tokens=max_new_tokens)
            _, correct = self._score(module, backend.generate(prompt_token_ids(tokenizer, prompts), sampling))
            metrics["eval/accuracy_sampled"] = sum(correct) / len(correct)
        return metrics

    @override
    def describe(self, first: dict[str, float], last: dict[str, float]) -> str:
        return (
            f"eval/accuracy: {first['eval/accuracy']:.3f} (step {first['step']}) -> {last['eval/accuracy']:.3f} "
            f"(step {last['step']}) on {len(self.rows)} held-out problems; answers with ####: "
            f"{first['eval/format_rate']:.3f} -> {last['eval/format_rate']:.3f}"
        )
