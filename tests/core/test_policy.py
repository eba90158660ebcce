"""The controlled run's policies (hypervisor/core/policy.py): pure functions of a seed and the
ready sets they are shown, so a seed names one interleaving (docs/schedule.md section 3)."""

import pytest

from hypervisor.core.policy import STEP_QUANTUM_NS, Kills, PctPolicy, RandomPolicy, RecordedKills, ReplayPolicy, ScheduleSpec, parse_schedule

A, B, C = (1, 0), (1, 1), (2, 0)


def _run(policy, rounds: int, ready=(A, B, C)) -> list:
    return [policy.choose(list(ready)) for _ in range(rounds)]


@pytest.mark.parametrize(
    "text, spec",
    [
        ("free", ScheduleSpec()),
        ("random:7", ScheduleSpec("random", 7)),
        ("pct:7", ScheduleSpec("pct", 7, 3)),
        ("pct:7:5", ScheduleSpec("pct", 7, 5)),
        ("replay:/tmp/x.json", ScheduleSpec("replay", file="/tmp/x.json")),
    ],
)
def test_schedule_specs_parse_and_print_back(text, spec):
    assert parse_schedule(text) == spec
    assert parse_schedule(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "fifo", "random", "random:x", "random:1:2", "pct:1:2:3", "pct:1:0", "replay:", "free:1", "pct:\u0663"])
def test_a_bad_schedule_says_what_is_expected(text):
    with pytest.raises(ValueError, match="--schedule"):
        parse_schedule(text)


@pytest.mark.parametrize("make", [lambda seed: RandomPolicy(seed), lambda seed: PctPolicy(seed, 3, 100)])
def test_a_seed_names_one_sequence_and_another_seed_another(make):
    assert _run(make(1), 300) == _run(make(1), 300)
    assert _run(make(1), 300) != _run(make(2), 300)


def test_pct_runs_the_highest_priority_until_a_change_point_drops_it():
    policy = PctPolicy(seed=3, depth=2, steps=50, spin_bound=10**9)
    (change,) = policy.change_points  # the decision (counted from 1) before which it drops
    chosen = _run(policy, 50, ready=(A, B))
    assert change >= 2 and len(set(chosen[: change - 1])) == 1  # one vCPU runs alone until then
    assert chosen[change - 2] != chosen[change - 1] and len(set(chosen[change - 1 :])) == 1  # then the other


def test_pct_drops_a_vcpu_that_wins_spin_bound_decisions_in_a_row():
    """A spinning vCPU (a load that keeps returning the same value) cannot starve the vCPU it
    waits for: every ready vCPU runs within spin_bound + 1 decisions (as Shuttle's PCT drops a
    task that yields)."""
    policy = PctPolicy(seed=3, depth=1, steps=1000, spin_bound=8)
    chosen = _run(policy, 200)
    for start in range(0, 200 - 27):
        assert set(chosen[start : start + 27]) == {A, B, C}


def test_replay_follows_the_record_and_says_where_it_cannot():
    policy = ReplayPolicy([A, B, A])
    assert [policy.choose([A, B]), policy.choose([A, B])] == [A, B]
    assert policy.choose([B, C]) is None  # the record's A is not ready: the run diverged
    assert policy.choose([A]) == A and policy.choose([A]) is None  # past the record's end


def test_kills_are_the_seeds_at_the_rate_asked_and_only_within_the_run():
    """--kill-vcpus in a controlled run (docs/schedule.md section 10): a seed names the steps
    that kill, about rate x vCPUs x quantum of them, none past the run's length."""
    steps, rate, vcpus = 20_000, 5.0, 2

    def killing(seed: int) -> list[int]:
        kills = Kills(seed, rate, steps)
        return [step for step in range(1, 2 * steps) if kills.kill(step, vcpus)]

    expected = steps * rate * vcpus * STEP_QUANTUM_NS / 1e9
    assert killing(4) == killing(4) != killing(5)
    assert 0.5 * expected < len(killing(4)) < 1.5 * expected and max(killing(4)) <= steps
    assert not any(Kills(4, 0.0, steps).kill(step, vcpus) for step in range(1, steps))
    assert [step for step in range(1, 100) if RecordedKills([3, 40]).kill(step, vcpus)] == [3, 40]
