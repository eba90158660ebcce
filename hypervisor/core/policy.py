"""Who runs next in a controlled run: seeded choices among the vCPUs that have a message waiting.

Xen's scheduler decides which vCPU runs; in xensim the vCPUs are processes the operating
system runs, so by default the server answers whatever arrives first and an interleaving is
luck. In a controlled run (`serve --schedule`, docs/schedule.md section 1) the server's gate
(hypervisor/server/schedule.py) holds each vCPU's Session message until every vCPU it expects
a message from has one waiting, then asks a policy here which one runs: one step. The policies
are pure functions of their seed and the sequence of ready sets they are shown, so a seed names
one interleaving, and the chosen sequence replays it.

- `RandomPolicy`: uniformly at random among the ready vCPUs.
- `PctPolicy`: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010, as Shuttle's
  shuttle/src/scheduler/pct.rs implements it): random distinct priorities, the highest-priority
  ready vCPU runs, and at depth-1 change points chosen at random among the first `steps`
  decisions the vCPU that ran last drops below every other. A vCPU that spins (a load that
  keeps returning the same value is a message like any other) would keep the highest priority
  for ever and starve the vCPU it waits for; as Shuttle drops a task that yields, a vCPU that
  ran `spin_bound` decisions in a row drops too (docs/schedule.md section 3).
- `ReplayPolicy`: the recorded sequence, step by step; None where it cannot be followed.

Kill-and-restart fault injection is a schedule decision too (`Kills`, see
docs/schedule.md section 10): at a step, the vCPU chosen may have its process killed instead of
its message run, drawn from a generator of its own seeded from the run's seed, or read from the
schedule file in a replay (`RecordedKills`).
"""

import random
from dataclasses import dataclass

Key = tuple[int, int]  # (domid, vcpu_id)

DEFAULT_DEPTH = 3  # PCT's d: finds any bug of depth 3 with probability >= 1/(n k^2)
DEFAULT_PCT_STEPS = 10_000  # PCT's k when the run's length is not known
SPIN_BOUND = 64  # decisions in a row one vCPU may win while another is ready
STEP_QUANTUM_NS = 100_000  # Xen system time a step takes in a controlled run: 10,000 steps a second
MODES = ("free", "random", "pct", "replay")


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed --schedule: free, random:SEED, pct:SEED[:DEPTH] or replay:FILE."""

    mode: str = "free"
    seed: int | None = None
    depth: int = DEFAULT_DEPTH
    file: str | None = None

    @property
    def controlled(self) -> bool:
        return self.mode != "free"

    def __str__(self) -> str:
        if self.mode == "free":
            return "free"
        if self.mode == "replay":
            return f"replay:{self.file}"
        return f"pct:{self.seed}:{self.depth}" if self.mode == "pct" else f"random:{self.seed}"


def parse_schedule(text: str) -> ScheduleSpec:
    """Parse --schedule; ValueError with a message that says what is expected."""
    mode, _, rest = text.partition(":")
    usage = f"--schedule {text!r}: expected free, random:SEED, pct:SEED[:DEPTH] or replay:FILE"
    if mode == "free" and not rest:
        return ScheduleSpec()
    if mode == "replay" and rest:
        return ScheduleSpec("replay", file=rest)
    if mode not in ("random", "pct") or not rest:
        raise ValueError(usage)
    words = rest.split(":")
    if len(words) > (2 if mode == "pct" else 1) or not all(w.isascii() and w.lstrip("-").isdigit() for w in words):
        raise ValueError(usage)
    depth = int(words[1]) if len(words) == 2 else DEFAULT_DEPTH
    if depth < 1:
        raise ValueError(f"--schedule {text!r}: PCT's depth is at least 1")
    return ScheduleSpec(mode, int(words[0]), depth)


class RandomPolicy:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choose(self, ready: list[Key]) -> Key:
        return ready[self.rng.randrange(len(ready))] if len(ready) > 1 else ready[0]


class PctPolicy:
    """PCT over vCPUs. Priorities are numbers, lower runs first: a vCPU seen for the first time
    gets a random one in [0, 1); one that drops gets the next integer from 1 up, below every
    vCPU that has not dropped and below those that dropped before it. Only decisions with a
    choice count as steps toward a change point (docs/schedule.md section 3: no change point
    is needed while one vCPU runs alone)."""

    def __init__(self, seed: int, depth: int = DEFAULT_DEPTH, steps: int = DEFAULT_PCT_STEPS, spin_bound: int = SPIN_BOUND):
        self.rng = random.Random(seed)
        self.priority: dict[Key, float] = {}
        self.change_points = frozenset(self.rng.sample(range(1, max(steps, 2)), min(depth - 1, max(steps - 1, 1))))
        self.spin_bound = spin_bound
        self.decisions = 0
        self.dropped = 0
        self.last: Key | None = None
        self.streak = 0

    def choose(self, ready: list[Key]) -> Key:
        for key in ready:
            if key not in self.priority:
                self.priority[key] = self.rng.random()
        if len(ready) > 1:
            self.decisions += 1
            if self.last is not None and (self.decisions in self.change_points or self.streak >= self.spin_bound):
                self.dropped += 1
                self.priority[self.last] = self.dropped
                self.streak = 0
        chosen = min(ready, key=self.priority.__getitem__)
        self.streak = self.streak + 1 if chosen == self.last and len(ready) > 1 else 0
        self.last = chosen
        return chosen


class Kills:
    """Which steps kill the chosen vCPU's process instead of running its message: each of the
    run's first `steps` steps with chance `rate` x (vCPUs) x STEP_QUANTUM_NS, so that each of
    vCPUs sharing the steps evenly is killed `rate` times per second of Xen system time, as
    `stress --kill-vcpus RATE` kills per second of wall time in a free run. A generator of its
    own, seeded from the run's seed, so that the kills do not change the policy's choices."""

    def __init__(self, seed: int, rate: float, steps: int):
        self.rng = random.Random(f"kill-vcpus:{seed}")
        self.rate, self.steps = rate, steps

    def kill(self, step: int, vcpus: int) -> bool:
        """Whether step `step` (counted from 1) of a run of `vcpus` vCPUs kills the one chosen."""
        return bool(self.rate) and step <= self.steps and self.rng.random() < self.rate * vcpus * STEP_QUANTUM_NS / 1e9


class RecordedKills:
    """A replay's kills: the steps its schedule file says killed the vCPU chosen."""

    def __init__(self, steps: list[int]):
        self.steps = frozenset(steps)

    def kill(self, step: int, vcpus: int) -> bool:
        return step in self.steps


class ReplayPolicy:
    """The recorded choices in order; None once the run asks for a step the record does not
    have, or has not got the recorded vCPU ready (the run diverged)."""

    def __init__(self, steps: list[Key]):
        self.steps = steps
        self.next = 0

    def choose(self, ready: list[Key]) -> Key | None:
        if self.next >= len(self.steps) or self.steps[self.next] not in ready:
            return None
        self.next += 1
        return self.steps[self.next - 1]


def policy_for(spec: ScheduleSpec, steps: int = DEFAULT_PCT_STEPS, recorded: list[Key] | None = None):
    """The policy of a controlled --schedule (`recorded`: a replay's steps)."""
    if spec.mode == "random":
        return RandomPolicy(spec.seed)
    if spec.mode == "pct":
        return PctPolicy(spec.seed, spec.depth, steps)
    if spec.mode == "replay":
        return ReplayPolicy(recorded or [])
    raise ValueError(f"schedule {spec} is not controlled")
