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
"""

import asyncio
import json
import logging

from hypervisor.core.policy import STEP_QUANTUM_NS, Key, ScheduleSpec, policy_for

log = logging.getLogger("xensim.server")

SCHEDULE_FORMAT = 1


class Gate:
    def __init__(self, runtime, spec: ScheduleSpec, policy, seed: int | None, silence_s: float):
        self.runtime = runtime
        self.hv = runtime.hv
        self.spec = spec
        self.policy = policy
        self.seed = seed
        self.silence_s = silence_s
        self.now_ns = 0
        self.steps: list[Key] = []
        self.lost: list[dict] = []  # each {"step", "vcpus", "why"}: where determinism was lost
        self._waiting: dict[Key, asyncio.Future] = {}
        self._running: Key | None = None
        self._aside: set[Key] = set()
        self._gone: set[Key] = set()  # vCPUs whose process ended its Session
        self._loop = asyncio.get_running_loop()
        self._decision: asyncio.Handle | None = None
        self._silence: asyncio.TimerHandle | None = None

    # -- the hooks of vcpus.py and hypercalls.py -------------------------------------------------

    async def turn(self, slot) -> bool:
        """Wait until this vCPU's message may run; False (at once) for a message of a vCPU Xen
        does not run, which the core refuses without a trace or an effect, so it is no step."""
        key = (slot.domid, slot.vcpu_id)
        self._aside.discard(key)
        if not self._runs(key):
            return False
        future = self._waiting[key] = self._loop.create_future()
        self.poke()
        try:
            await future
        except asyncio.CancelledError:  # the handler was ended (DestroyDomain, shutdown)
            if self._waiting.get(key) is future:
                del self._waiting[key]
            elif self._running == key:
                self.done(slot)
            raise
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

    def detached(self, slot) -> None:
        """Its process ended the Session: no message is expected from it any more, and a step
        it was in (its handler raised) is over."""
        key = (slot.domid, slot.vcpu_id)
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
        if self.hv.tracer is not None:
            self.hv.tracer({"sched": [len(self.steps), *key]})
        self._running = key
        self._waiting.pop(key).set_result(None)

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
        }


def gate(runtime, config) -> Gate:
    """The gate of `config.schedule`; a replay takes its steps and seed from the file."""
    recorded = config.recorded or {}
    steps = [tuple(step) for step in recorded.get("steps", ())]
    seed = recorded.get("seed") if config.schedule.mode == "replay" else config.schedule.seed
    return Gate(runtime, config.schedule, policy_for(config.schedule, config.pct_steps, steps), seed, config.silence_s)


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
    if not isinstance(steps, list) or record.get("xensim_schedule") != SCHEDULE_FORMAT or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s) for s in steps):
        raise ValueError(f"{path} is not a xensim schedule file (format {SCHEDULE_FORMAT}, written by serve --schedule-file)")
    return record
