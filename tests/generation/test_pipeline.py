"""PipelinedSource's pipeline, staleness bound and restarts against a stand-in generator: no processes, milliseconds.

The subprocess tests in tests/strategies/test_async.py run the same paths with real generators.
"""

import itertools

import pytest
import torch

from fake_generator import FakeGenerator, Policy, weights_of
from lightning_rlhf.generation import Generations, SamplingConfig
from lightning_rlhf.generation.pipeline import PipelinedSource, ScoringBalance
from lightning_rlhf.generation.process import GeneratorError

SAMPLING = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)


def run(
    source: PipelinedSource, policy: Policy, batches: int, probe_at: int | None = None
) -> tuple[list[int], list[int]]:
    """Drive ``source`` as an RL module does: step, train ``policy``, after_update.
    Returns the prompts trained and their staleness."""
    trained, staleness, version = [], [], policy.version
    for prompt in range(batches):
        ready = source.next_rollouts([{"prompt": prompt}], [[prompt]], SAMPLING, version)
        if ready is None:
            continue
        rows, generations = ready
        trained.append(rows[0]["prompt"])
        staleness.append(version - generations.policy_version)
        version = policy.version = version + 1
        source.after_update(version)
        if version == probe_at:
            source.probe_logprobs(version)
    return trained, staleness


def restarting(
    first: FakeGenerator, *replacements: FakeGenerator
) -> tuple[PipelinedSource, Policy, list[FakeGenerator]]:
    started, policy = [first], Policy()
    fresh = iter(replacements) if replacements else (FakeGenerator() for _ in itertools.count())

    def restart():
        started.append(next(fresh))
        return started[-1]

    return (
        PipelinedSource(first, max_staleness=1, sync_every=1, weights=policy.weights, restart=restart),
        policy,
        started,
    )


def test_the_stand_in_generator_refuses_a_refresh_without_that_version_s_weights():
    generator = FakeGenerator()
    with pytest.raises(AssertionError, match="the refresh to version 3 carried"):
        generator.push_weights(Policy(version=2).weights(), 3)  # stale
    read = Policy(version=3).weights()
    read.drain()  # a stream is read once: sent again it has no tensors left
    with pytest.raises(AssertionError, match="2 tensors described, 0 sent"):
        generator.push_weights(read, 3)
    assert generator.version is None  # neither was taken
    generator.push_weights(Policy(version=3).weights(), 3)
    assert generator.version == 3 and generator.weights["w"].tolist() == [3.0, 3.0]


@pytest.mark.parametrize("max_staleness, expected", [(0, [0] * 8), (1, [0] + [1] * 6), (2, [0, 1] + [2] * 4)])
def test_the_pipeline_keeps_max_staleness_batches_in_flight(max_staleness, expected):
    policy = Policy()
    source = PipelinedSource(FakeGenerator(), max_staleness, sync_every=1, weights=policy.weights)
    trained, staleness = run(source, policy, 8)
    assert trained == list(range(8 - max_staleness)) and staleness == expected
    # refreshed after every version (sync_every=1); only the first request's refresh was the bound's
    assert [(r.version, r.reason) for r in source.refreshes] == [(0, "bound")] + [
        (v, "period") for v in range(1, 9 - max_staleness)
    ]


def test_a_refresh_period_longer_than_the_bound_is_made_up_by_forced_refreshes():
    policy = Policy()
    source = PipelinedSource(FakeGenerator(), max_staleness=1, sync_every=3, weights=policy.weights)
    _, staleness = run(source, policy, 9)
    assert max(staleness) <= 1 and source.forced_refreshes > 1
    assert [r.version for r in source.refreshes if r.reason == "period"] == [3, 6]  # and the period still holds


# the old code lost the batch whose result it was awaiting when the generator died ("result")
@pytest.mark.parametrize("die_at", [("result", 2), ("result", 1), ("submit", 3), ("push", 2), ("logprobs", 1)])
def test_a_replacement_is_asked_again_for_every_batch_in_flight(die_at):
    source, policy, started = restarting(FakeGenerator(die_at=die_at))
    trained, staleness = run(source, policy, 9, probe_at=3)
    assert trained == list(range(8))  # every prompt drawn, once, in order
    assert max(staleness) <= 1
    assert source.restarts == 1 and len(started) == 2 and started[0].closed
    assert started[1].version == 8  # the replacement was refitted, then refreshed as usual
    assert torch.equal(started[1].weights["w"], weights_of(8)["w"])  # and holds that version's weights


def test_a_replacement_that_dies_while_being_refitted_is_replaced_in_turn():
    source, policy, started = restarting(
        FakeGenerator(die_at=("result", 2)), FakeGenerator(die_at=("submit", 1)), FakeGenerator()
    )
    trained, _ = run(source, policy, 9)
    assert trained == list(range(8)) and source.restarts == 2


def test_after_max_restarts_failures_in_a_row_the_error_stops_training():
    source, policy, started = restarting(
        FakeGenerator(die_at=("result", 1)), *[FakeGenerator(die_at=("push", 1)) for _ in range(4)]
    )
    with pytest.raises(GeneratorError, match="died at push 1"):
        run(source, policy, 4)
    assert source.restarts == 3  # max_restarts replacements, then the error


def test_without_restart_a_death_is_an_error():
    policy = Policy()
    source = PipelinedSource(FakeGenerator(die_at=("result", 1)), max_staleness=1, sync_every=1, weights=policy.weights)
    with pytest.raises(GeneratorError):
        run(source, policy, 4)


def test_a_resume_asks_again_for_the_checkpoint_s_prompts_first_with_the_current_weights():
    policy = Policy(version=5)  # the checkpoint's
    source = PipelinedSource(FakeGenerator(), max_staleness=1, sync_every=1, weights=policy.weights)
    source.resubmit(
        [[{"prompt": 10}], [{"prompt": 11}]], lambda rows: [[r["prompt"]] for r in rows], SAMPLING, version=5
    )
    assert source.refreshes[0].reason == "resume" and [rows for rows in source.pending_rows()] == [
        [{"prompt": 10}],
        [{"prompt": 11}],
    ]
    ready = source.next_rollouts([{"prompt": 12}], [[12]], SAMPLING, 5)
    assert ready[0] == [{"prompt": 10}] and ready[1].policy_version == 5


def test_an_evaluation_sees_the_current_weights_and_leaves_the_pipeline_as_it_was():
    policy = Policy()
    source = PipelinedSource(FakeGenerator(), max_staleness=1, sync_every=2, weights=policy.weights)
    source.next_rollouts([{"prompt": 0}], [[0]], SAMPLING, 0)  # in flight, sampled with version 0
    policy.version = 1
    source.after_update(1)  # sync_every 2: the generator still holds version 0
    evaluated = source.evaluate([[5], [6]], SAMPLING, 1)
    assert evaluated.policy_version == 1 and evaluated.prompt_ids == [[5], [6]]
    assert [(r.version, r.reason) for r in source.refreshes] == [(0, "bound"), (1, "eval")]
    assert source.pending_rows() == [[{"prompt": 0}]]  # the request in flight is still the next to train on
    source.evaluate([[5]], SAMPLING, 1)  # already current: no second refresh
    assert len(source.refreshes) == 2


def test_training_requests_carry_their_rows_to_be_scored_and_evaluations_do_not():
    generator = FakeGenerator()
    source, policy, started = restarting(generator, FakeGenerator())
    source.next_rollouts([{"prompt": 0}], [[0]], SAMPLING, 0)
    source.next_rollouts([{"prompt": 1}, {"prompt": 2}], [[1], [2]], SAMPLING, 0)  # a row per prompt, shared too
    source.evaluate([[5]], SAMPLING, 0)
    assert list(generator.rows.values()) == [[{"prompt": 0}], [{"prompt": 1}, {"prompt": 2}], None]
    generator.dead = True  # the replacement is asked again for the request in flight, with its rows
    policy.version = 1
    source.next_rollouts([{"prompt": 3}], [[3]], SAMPLING, 1)
    assert list(started[1].rows.values())[:2] == [[{"prompt": 1}, {"prompt": 2}], [{"prompt": 3}]]


def simulate(balance: ScoringBalance, steps: int, gen_seconds, train_seconds, score_seconds: float = 0.1):
    """The asynchronous timeline (max_staleness=1) of a generator and a trainer that share each batch's scoring.

    At step i the trainer sends for batch i + 1 and asks for batch i; the generator samples each batch
    (``gen_seconds(i)``) and scores the share it was sent with; the trainer scores the rest and learns
    (``train_seconds(i)``). Scoring a whole batch takes ``score_seconds`` on either side.
    Returns each batch's share and each step's wait on either side (positive: the trainer waited).
    """
    shares, gaps = {0: balance.share_for(0)}, []
    generator_free = trainer_free = sent = 0.0  # sent: when the batch the generator samples next was sent for
    for i in range(steps):
        asked = trainer_free  # the trainer has finished step i - 1: it sends for batch i + 1, then asks for batch i
        shares[i + 1] = balance.share_for(i + 1)
        generator_start, sent = max(generator_free, sent), asked
        scoring = shares[i] * score_seconds
        finished = generator_start + gen_seconds(i) + scoring
        generator_free = finished
        balance.measured(i, Generations([[1]], [[2]], [[0.0]], ["stop"], 0, 1, [0.0], scoring, finished), asked)
        gaps.append(finished - asked)
        trainer_free = max(asked, finished) + train_seconds(i) + (1 - shares[i]) * score_seconds
    return [shares[i] for i in range(steps)], gaps


@pytest.mark.parametrize("gen_seconds, train_seconds", [(0.02, 0.05), (0.06, 0.01), (0.05, 0.02)])
def test_the_scoring_balance_settles_where_neither_side_waits(gen_seconds, train_seconds):
    # balanced where gen_seconds + share * 0.1 s = train_seconds + (1 - share) * 0.1 s (0.65, 0.25 and 0.35 here)
    shares, gaps = simulate(ScoringBalance(), 60, lambda i: gen_seconds, lambda i: train_seconds)
    balanced = (train_seconds + 0.1 - gen_seconds) / 0.2
    assert shares[-1] == pytest.approx(balanced, abs=1e-3)
    assert abs(gaps[-1]) < 1e-3 and abs(gaps[1]) > 1e-3  # it started off balance and got there


def test_the_scoring_balance_follows_a_side_that_slows_down_and_recovers():
    # the generator samples 60 % slower for steps 10-39: the share moves to the trainer and back
    slow = lambda i: 0.04 * (1.6 if 10 <= i < 40 else 1.0)  # noqa: E731
    shares, gaps = simulate(ScoringBalance(), 70, slow, lambda i: 0.04)
    assert shares[9] == pytest.approx(0.5) and shares[69] == pytest.approx(0.5, abs=1e-2)
    assert shares[39] == pytest.approx((0.04 + 0.1 - 0.064) / 0.2, abs=1e-2)
    assert gaps[10] > 0.02 and max(abs(g) for g in gaps[24:40]) < 0.2 * gaps[10]  # in 14 steps, 80 % of it gone
    for gain in (0.1, 1.0, 1.9):  # stable with any gain below 2
        shares, gaps = simulate(ScoringBalance(gain=gain), 200, slow, lambda i: 0.04)
        assert abs(gaps[-1]) < 1e-3


def test_the_scoring_balance_stays_between_none_and_all():
    # a generator with nothing else to do scores everything; one that is always late (synchronous) nothing
    idle, _ = simulate(ScoringBalance(), 10, lambda i: 0.0, lambda i: 0.3)
    late, _ = simulate(ScoringBalance(), 10, lambda i: 0.3, lambda i: 0.0)
    assert idle[-1] == 1.0 and late[-1] == 0.0


def test_the_probe_travels_with_each_refresh_and_its_answer_is_read_without_waiting():
    generator = FakeGenerator()
    policy = Policy()
    source = PipelinedSource(generator, max_staleness=1, sync_every=1, weights=policy.weights)
    source.set_probe(([1], [2], 1.0))
    run(source, policy, 4)
    assert list(generator.probes.values()) == [([1], [2], 1.0)] * 4  # the bound's refresh and 3 periodic ones
    assert source.probe_logprobs(3) == [0.0]
    source.set_probe(None)
    policy.version = 9
    source.refresh(9, "period")
    assert generator.probes[9] is None and source.probe_logprobs(9) is None
