"""The gate of a controlled run: the server decides which vCPU's Session message runs next.

Theory of operation (docs/schedule.md sections 1-2). A step is one Session message: its calls
and its answer, with the pushes due before it (an Upcall goes out only ahead of an answer, so
a guest meets it at the same point of its own sequence of messages every time). The gate holds
each vCPU's message (`turn`) until every vCPU it expects a message from has one waiting, then
lets the one the policy (hypervisor/core/policy.py) chooses run; the next decision waits until
that step is over (`done`). It expects a message from every vCPU that Xen would run: up, not
asleep in SCHEDOP_block/poll, of a domain neither paused nor shut down, and whose process has
not ended its Session (a vCPU whose process has not attached yet is waited for). A call that
sleeps ends its step (`done`); once woken, the rest of its message is a step of its own.

Time is virtual: Xen's system time advances STEP_QUANTUM_NS per step, timers fire at step
boundaries when it passes their deadline, and when every vCPU sleeps it jumps to the next
deadline. A vCPU silent for `silence_s` of wall time while the gate waits for it (a process
that died, or computes for long) is set aside, so the run never hangs; from that step on the
run is marked as having lost determinism, in `lost` and in the trace.

The chosen sequence is kept in `steps`; `record()` is the schedule file that `replay:FILE`
follows. Each step is also a trace record {"sched": [step, domid, vcpu_id]} (replay skips
them).

With kills on (`--schedule-kills RATE`, docs/schedule.md section 10), a step may kill the chosen
vCPU's process instead of running its message: its Session ends with ABORTED and
KILLED_BY_SCHEDULE, the process kills itself with SIGKILL (guestlib/vcpu.py), and the gate
goes on expecting a message from that vCPU, so it waits for the restarted process as for any
vCPU whose process has not attached yet. The step is recorded with "kill".
"""

import asyncio
import json
import logging

import grpc

from hypervisor.core.policy import STEP_QUANTUM_NS, Key, Kills, RecordedKills, ScheduleSpec, policy_for
from xensim.errors import KILLED_BY_SCHEDULE

from .errors import Refused

log = logging.getLogger("xensim.server")

SCHEDULE_FORMAT = 1


class Gate:
    def __init__(self, runtime, spec: ScheduleSpec, policy, seed: int | None, silence_s: float, kills=None, kill_rate: float = 0.0):
        self.runtime = runtime
        self.hv = runtime.hv
        self.spec = spec
        self.policy = policy
        self.seed = seed
        self.silence_s = silence_s
        self.kills = kills or RecordedKills([])
        self.kill_rate = kill_rate  # --kill-vcpus, as recorded
        self.now_ns = 0
        self.steps: list[Key] = []
        self.killed: list[int] = []  # the steps that killed the vCPU chosen
        self.lost: list[dict] = []  # each {"step", "vcpus", "why"}: where determinism was lost
        self._waiting: dict[Key, asyncio.Future] = {}
        self._running: Key | None = None
        self._aside: set[Key] = set()
        self._gone: set[Key] = set()  # vCPUs whose process ended its Session
        self._killable: set[Key] = set()  # vCPUs waiting with a new message (not the rest of one that slept)
        self._restarting: set[Key] = set()  # vCPUs whose process a step killed: their next process is waited for
        self._loop = asyncio.get_running_loop()
        self._decision: asyncio.Handle | None = None
        self._silence: asyncio.TimerHandle | None = None

    # -- the hooks of vcpus.py and hypercalls.py -------------------------------------------------

    async def turn(self, slot, killable: bool = False) -> bool:
        """Wait until this vCPU's message may run; False (at once) for a message of a vCPU Xen
        does not run, which the core refuses without a trace or an effect, so it is no step.
        A new message (`killable`, not the rest of one that slept) may instead be the step
        that kills the vCPU's process: Refused, which ends its Session."""
        key = (slot.domid, slot.vcpu_id)
        self._aside.discard(key)
        if not self._runs(key):
            return False
        future = self._waiting[key] = self._loop.create_future()
        if killable:
            self._killable.add(key)
        self.poke()
        try:
            killed = await future
        except asyncio.CancelledError:  # the handler was ended (DestroyDomain, shutdown)
            if self._waiting.get(key) is future:
                del self._waiting[key]
                self._killable.discard(key)
            elif self._running == key:
                self.done(slot)
            raise
        if killed:
            raise Refused(grpc.StatusCode.ABORTED, f"{_names([key])} {KILLED_BY_SCHEDULE} at step {len(self.steps)} (--kill-vcpus)")
        return True

    def done(self, slot) -> bool:
        """The step of this vCPU's message is over: its answer is sent, or one of its calls
        sleeps (the rest of the message is a step of its own once woken). False if the vCPU was
        in no step (a unary call, which the gate does not hold)."""
        if self._running != (slot.domid, slot.vcpu_id):
            return False
        self._running = None
        self.poke()
        return True

    def attached(self, slot) -> None:
        self._gone.discard((slot.domid, slot.vcpu_id))
        self._restarting.discard((slot.domid, slot.vcpu_id))

    def detached(self, slot) -> None:
        """Its process ended the Session: no message is expected from it any more (unless a
        step killed it: then from the process that restarts it), and a step it was in (its
        handler raised) is over."""
        key = (slot.domid, slot.vcpu_id)
        if key not in self._restarting:
            self._gone.add(key)
        if self._running == key:
            self._running = None
        self.poke()

    def poke(self) -> None:
        """Look again, soon, whether a step can be chosen (coalesced)."""
        if self._decision is None:
            self._decision = self._loop.call_soon(self._decide)

    # -- deciding ------------------------------------------------------------------------------

    def _runs(self, key: Key) -> bool:
        """Whether Xen runs this vCPU: up, of a domain that is neither paused nor shut down."""
        domain = self.hv.domains.get(key[0])
        if domain is None or domain.shutdown_code is not None or key[0] in self.runtime.paused:
            return False
        return 0 <= key[1] < len(domain.vcpus) and not domain.vcpus[key[1]].down

    def _expected(self) -> set[Key]:
        expected = set()
        for domid, domain in self.hv.domains.items():
            for vcpu in domain.vcpus:
                key = (domid, vcpu.vcpu_id)
                if not vcpu.blocked and key not in self._aside and key not in self._gone and self._runs(key):
                    expected.add(key)
        return expected

    def _decide(self) -> None:
        self._decision = None
        if self._running is not None:
            return
        self._fire_timers()
        expected = self._expected()
        if not expected.issubset(self._waiting):
            if self._silence is None:
                self._silence = self._loop.call_later(self.silence_s, self._set_aside)
            return
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if not self._waiting:
            deadline = self.hv.next_deadline()
            if deadline is not None and not expected:  # every vCPU sleeps: the next timer is next
                self.now_ns = max(self.now_ns, deadline)
                self._fire_timers()
            return
        ready = sorted(self._waiting)
        key = self.policy.choose(ready)
        if key is None:
            self._lose(ready, f"the schedule file has no step {len(self.steps)} for the vCPUs ready ({_names(ready)})")
            key = ready[0]
        self.now_ns += STEP_QUANTUM_NS
        self.steps.append(key)
        step = len(self.steps)
        killed = key in self._killable and self.kills.kill(step, sum(len(d.vcpus) for d in self.hv.domains.values()))
        self._killable.discard(key)
        if killed:
            self.killed.append(step)
            self._restarting.add(key)
            log.info("schedule: step %d kills %s's process", step, _names([key]))
        if self.hv.tracer is not None:
            self.hv.tracer({"sched": [step, *key, "kill"] if killed else [step, *key]})
        self._running = key
        self._waiting.pop(key).set_result(killed)

    def _fire_timers(self) -> None:
        deadline = self.hv.next_deadline()
        if deadline is not None and deadline <= self.now_ns:
            self.hv.advance_time(self.now_ns)
            self.runtime.drain()

    def _set_aside(self) -> None:
        self._silence = None
        if self._running is not None:
            return
        silent = sorted(self._expected().difference(self._waiting))
        if silent:
            self._aside.update(silent)
            self._lose(silent, f"sent nothing for {self.silence_s:g} s while the gate waited for it")
            self.poke()

    def _lose(self, keys: list[Key], why: str) -> None:
        lost = {"step": len(self.steps), "vcpus": [list(k) for k in keys], "why": f"{_names(keys)}: {why}"}
        self.lost.append(lost)
        log.warning("schedule: determinism lost at step %d: %s", lost["step"], lost["why"])
        if self.hv.tracer is not None:
            self.hv.tracer({"sched": {"lost_determinism": lost}})

    # -- the record ----------------------------------------------------------------------------

    def record(self) -> dict:
        """The schedule file: what `replay:FILE` follows (docs/schedule.md section 5)."""
        return {
            "xensim_schedule": SCHEDULE_FORMAT,
            "schedule": str(self.spec),
            "seed": self.seed,
            "quantum_ns": STEP_QUANTUM_NS,
            "steps": [list(key) for key in self.steps],
            "lost_determinism": self.lost,
            "kill_vcpus": self.kill_rate,
            "kills": self.killed,
        }


def gate(runtime, config) -> Gate:
    """The gate of `config.schedule`; a replay takes its steps and seed from the file."""
    recorded = config.recorded or {}
    steps = [tuple(step) for step in recorded.get("steps", ())]
    if config.schedule.mode == "replay":
        seed, kills, rate = recorded.get("seed"), RecordedKills(recorded.get("kills", [])), recorded.get("kill_vcpus", 0.0)
    else:
        seed, rate = config.schedule.seed, config.kill_rate
        kills = Kills(seed, rate, config.pct_steps)
    return Gate(runtime, config.schedule, policy_for(config.schedule, config.pct_steps, steps), seed, config.silence_s, kills, rate)


def write_schedule(gate: Gate, path: str) -> None:
    """Write the schedule file; a failure is logged, as a trace file's is (the run is over)."""
    try:
        with open(path, "w") as out:
            json.dump(gate.record(), out, separators=(",", ":"))
            out.write("\n")
    except OSError as e:
        log.warning("cannot write the schedule file %s: %s", path, e.strerror)
    log.info("schedule: %d steps written to %s%s", len(gate.steps), path, f"; determinism lost {len(gate.lost)} times" if gate.lost else "")


def _names(keys) -> str:
    return ", ".join(f"dom{d} vCPU {v}" for d, v in keys)


def load_record(path: str) -> dict:
    """A schedule file, checked; ValueError saying what is wrong with it."""
    try:
        with open(path) as f:
            record = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the schedule file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a schedule file: {e}") from None
    steps = record.get("steps") if isinstance(record, dict) else None
    kills = record.get("kills", []) if isinstance(record, dict) else None
    if (
        not isinstance(steps, list) or record.get("xensim_schedule") != SCHEDULE_FORMAT or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s) for s in steps)
        or not isinstance(kills, list) or not all(isinstance(k, int) for k in kills) or not isinstance(record.get("kill_vcpus", 0.0), (int, float))
    ):  # fmt: skip
        raise ValueError(f"{path} is not a xensim schedule file (format {SCHEDULE_FORMAT}, written by serve --schedule-file)")
    return record


def check_kills(record: dict, path: str, rate: float, option: str = "--kill-vcpus") -> None:
    """A replay kills where its file says: a kill rate (`option`) other than the one it was
    recorded with is a mistake (ValueError saying what to give)."""
    recorded = record.get("kill_vcpus", 0.0)
    if rate and rate != recorded:
        raise ValueError(f"{option} {rate:g}, but {path} was recorded with a kill rate of {recorded:g}: give that, or leave {option} out (a replay kills where its file says)")
