"""The scheduler as the core sees it: blocked and polling vCPUs, kicks, timers, shutdown.

Theory of operation. The core runs no vCPU: each runs in a process that the I/O layer (the
adapter) drives, so what Xen's scheduler does is reduced to state and notifications.

- A hypercall that would sleep (SCHEDOP_block, SCHEDOP_poll) answers `BLOCKED` instead of a
  result, as h11 answers NEED_DATA; the adapter holds the call until the vCPU is unblocked and
  then answers 0, which is what Xen returns once the vCPU runs again.
- Wherever Xen would wake, kick, pause or stop a vCPU (an event marked it pending, a poll
  ended, VCPUOP_up or _down, a shutdown), the core *pokes* it: it adds (domid, vcpu_id) to a
  set that the adapter drains with `Hypervisor.take_kicks()`, then looks at the vCPU's state
  (blocked? down? domain shut down? upcall deliverable?) to decide what to push. A set, because
  kicks coalesce: a storm of events leaves one entry, never an unbounded queue.
- A vCPU that Xen would not run (down, or of a domain that has shut down) makes no calls:
  `check_running` refuses them before they look at anything, with `VcpuNotRunning`.
- Time is the caller's. Timers hold absolute deadlines in ns on the caller's clock; the
  toolstack op `advance_time` (traced, so a replay sees the same time) moves the clock and runs
  the timers that are due, and `Scheduler.next_deadline` tells the adapter how long it may sleep.
- Xen's context switch is a change of runstate (`vcpu_runstate_change`): a vCPU is running
  unless it is blocked, down, paused or of a domain that shut down. Switching a vCPU out stops
  its periodic timer and switching it in restarts it, as Xen's schedule() does. A tick that
  raises nothing new parks the timer until something can make the next tick news: the
  domain's next call if the port was already pending, the binding of VIRQ_TIMER if none was
  bound. So a guest that never takes its ticks costs the adapter no wake-ups
  (docs/vcpu-time.md section 5).
"""

import heapq
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from .abi import VIRQ_TIMER, Errno, RUNSTATE_blocked, RUNSTATE_offline, RUNSTATE_running
from .errors import VcpuNotRunning, XenError
from .walk import copy_to_guest

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .hypervisor import Hypervisor

TimerFn = Callable[["Hypervisor", "Vcpu"], None]
TickFn = Callable[["Hypervisor", "Vcpu"], bool]
PERIODIC_TIMER = "periodic_timer"


class Blocked(str, Enum):
    """The answer of a hypercall that put its vCPU to sleep. A str, so traces record it."""

    BLOCKED = "blocked"


BLOCKED = Blocked.BLOCKED


class Scheduler:
    """The vCPUs the adapter must look at, and Xen's per-vCPU timers (common/timer.c).

    A timer is named by (vCPU, kind), kind being Xen's field name ("singleshot_timer",
    "poll_timer"); arming it again replaces its deadline, as Xen's set_timer does. Replaced
    deadlines stay in the heap until they surface and are skipped, or until they outnumber the
    live ones and the heap is rebuilt, so re-arming costs O(log n) and memory stays bounded.
    """

    def __init__(self, tick: TickFn):
        self.now_ns = 0
        # What the periodic timer does when it fires: raise VIRQ_TIMER (schedop.send_timer_event,
        # which evtchn implements on top of this module), answering whether that was news.
        self.tick = tick
        # Periodic timers whose last tick was no news (docs/vcpu-time.md section 5): by domid,
        # those waiting for the domain's next call (their port was pending), and those waiting
        # for VIRQ_TIMER to be bound.
        self.parked: dict[int, list[Vcpu]] = {}
        self.unbound: set[Vcpu] = set()
        self.kicks: dict[tuple[int, int], None] = {}
        self._armed: dict[tuple[Vcpu, str], tuple[int, int, TimerFn]] = {}
        self._heap: list[tuple[int, int, Vcpu, str]] = []
        self._seq = 0

    def poke(self, vcpu: "Vcpu") -> None:
        self.kicks[(vcpu.domid, vcpu.vcpu_id)] = None

    def take_kicks(self) -> list[tuple[int, int]]:
        """The (domid, vcpu_id) poked since the last call, in first-poke order."""
        kicks = list(self.kicks)
        self.kicks.clear()
        return kicks

    def set_timer(self, vcpu: "Vcpu", kind: str, expires_ns: int, fn: TimerFn) -> None:
        self._seq += 1
        self._armed[(vcpu, kind)] = (expires_ns, self._seq, fn)
        heapq.heappush(self._heap, (expires_ns, self._seq, vcpu, kind))
        if len(self._heap) > 2 * len(self._armed) + 64:
            self._heap = [(expires, seq, v, k) for (v, k), (expires, seq, _) in self._armed.items()]
            heapq.heapify(self._heap)

    def stop_timer(self, vcpu: "Vcpu", kind: str) -> None:
        self._armed.pop((vcpu, kind), None)

    def timer_expires(self, vcpu: "Vcpu", kind: str) -> int | None:
        armed = self._armed.get((vcpu, kind))
        return None if armed is None else armed[0]

    def next_deadline(self) -> int | None:
        """The earliest armed deadline (ns on the caller's clock), or None if no timer is armed."""
        heap = self._heap
        while heap:
            expires, seq, vcpu, kind = heap[0]
            armed = self._armed.get((vcpu, kind))
            if armed is not None and armed[1] == seq:
                return expires
            heapq.heappop(heap)
        return None

    def pop_due(self) -> tuple["Vcpu", TimerFn] | None:
        """Disarm the earliest timer if it is due now and return it; None if none is due."""
        deadline = self.next_deadline()
        if deadline is None or deadline > self.now_ns:
            return None
        _, _, vcpu, kind = heapq.heappop(self._heap)
        return vcpu, self._armed.pop((vcpu, kind))[2]

    def forget(self, domain: "Domain") -> None:
        """A dying domain's vCPUs: kill their timers (vcpu_destroy) and drop their kicks."""
        self.parked.pop(domain.domid, None)
        self.unbound.difference_update(domain.vcpus)
        for vcpu in domain.vcpus:
            for kind in [k for v, k in self._armed if v is vcpu]:
                del self._armed[(vcpu, kind)]
            self.kicks.pop((vcpu.domid, vcpu.vcpu_id), None)


def s_time(deadline_ns: int) -> int:
    """A guest's u64 deadline as Xen's timers take it, an s_time_t: 2**63 and above are
    negative, so already past (set_timer, xen/common/timer.c)."""
    return deadline_ns - (1 << 64) if deadline_ns >> 63 else deadline_ns


def run_timers(hv: "Hypervisor") -> int:
    """Xen's TIMER_SOFTIRQ: run every timer whose deadline has passed, earliest first. Arming
    code calls it too, since Xen runs a timer set in the past before returning to the guest."""
    fired = 0
    while (due := hv.sched.pop_due()) is not None:
        vcpu, fn = due
        fn(hv, vcpu)
        fired += 1
    return fired


def advance_time(hv: "Hypervisor", now_ns: int) -> int:
    """Toolstack op: the caller's clock now reads `now_ns`; returns how many timers fired."""
    if now_ns < hv.sched.now_ns:
        raise XenError(Errno.EINVAL, f"time cannot go back: now_ns {now_ns} is before {hv.sched.now_ns}")
    hv.sched.now_ns = now_ns
    return run_timers(hv)


def vcpu_unblock(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """vcpu_unblock: end a block or a poll (the poll state goes with it) and poke the vCPU."""
    if not vcpu.blocked:
        return
    vcpu.blocked = False
    if vcpu.poll_evtchn:
        vcpu.poll_evtchn = 0
        hv.domains[vcpu.domid].poll_mask.discard(vcpu.vcpu_id)
    vcpu_runstate_change(hv, vcpu)
    hv.sched.poke(vcpu)


def runstate_of(hv: "Hypervisor", vcpu: "Vcpu") -> int:
    """The RUNSTATE_* Xen's schedule() gives a vCPU (xen/common/sched/core.c): blocked
    dominates; a vCPU that may not run (down, paused, shut down: vcpu_runnable) is offline;
    the rest run. RUNSTATE_runnable, waiting for a physical CPU, has no counterpart here."""
    if vcpu.blocked:
        return RUNSTATE_blocked
    domain = hv.domains[vcpu.domid]
    if vcpu.down or domain.paused or domain.shutdown_code is not None:
        return RUNSTATE_offline
    return RUNSTATE_running


def vcpu_runstate_change(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """Xen's context switch, called wherever what `runstate_of` looks at changed.

    vcpu_runstate_change: the time since state_entry_time goes to the old state. A vCPU
    switched out stops its periodic timer (schedule: stop_timer(&prev->periodic_timer)) and
    one switched in restarts it (vcpu_periodic_timer_work(next)); either way Xen rewrites the
    registered runstate area (context_switch: _update_runstate_area)."""
    new = runstate_of(hv, vcpu)
    runstate = vcpu.runstate
    old = runstate.state
    if new == old:
        return
    now = hv.sched.now_ns
    if now > runstate.state_entry_time:
        runstate.time[old] += now - runstate.state_entry_time
        runstate.state_entry_time = now
    runstate.state = new
    if old == RUNSTATE_running:
        stop_periodic_timer(hv, vcpu)
    elif new == RUNSTATE_running:
        vcpu_periodic_timer_work(hv, vcpu)
    if vcpu.runstate_guest:
        update_runstate_area(hv, vcpu)


def vcpu_runstate_get(hv: "Hypervisor", vcpu: "Vcpu") -> tuple[int, int, list[int]]:
    """vcpu_runstate_get: (state, state_entry_time, time[4]) with the time spent in the
    current state so far added to it, as VCPUOP_get_runstate_info reports."""
    runstate = vcpu.runstate
    time = list(runstate.time)
    time[runstate.state] += max(hv.sched.now_ns - runstate.state_entry_time, 0)
    return runstate.state, runstate.state_entry_time, time


def update_runstate_area(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """update_runstate_area (xen/common/domain.c): copy struct vcpu_runstate_info to the
    registered guest address through the vCPU's kernel pagetable: the int state padded to the
    u64s' alignment, then five little-endian u64s; 48 bytes for a 64-bit guest, 44 for a
    32-bit one, whose compat struct aligns u64s to 4 bytes (XLAT_vcpu_runstate_info;
    docs/pv32.md section 9). A copy that faults is dropped, as Xen drops it (its
    __copy_to_guest result is not looked at)."""
    runstate = vcpu.runstate
    state_bytes = hv.domains[vcpu.domid].abi.runstate_state_bytes
    record = runstate.state.to_bytes(state_bytes, "little") + b"".join(value.to_bytes(8, "little") for value in (runstate.state_entry_time, *runstate.time))
    copy_to_guest(hv.memory, vcpu.guest_table, vcpu.runstate_guest, record, vcpu.mode)


# -- the periodic timer (docs/vcpu-time.md section 5) -----------------------------------------


def vcpu_periodic_timer_work(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """vcpu_periodic_timer_work (xen/common/sched/core.c), also the timer's function: if a
    period has passed since the last tick, tick now; then arm the timer for a period after the
    last tick. Ticks that were missed are not made up. A timer whose next tick cannot be news
    (the last one was not, or VIRQ_TIMER is unbound) is parked instead (`Scheduler.parked`),
    as if each further tick were made and changed nothing."""
    period = vcpu.periodic_period
    if not period:
        return
    now = hv.sched.now_ns
    if now >= vcpu.periodic_last_event + period:
        vcpu.periodic_last_event = now
        if not hv.sched.tick(hv, vcpu):
            _park(hv, vcpu)
            return
    elif not vcpu.virq_to_evtchn[VIRQ_TIMER]:
        _park(hv, vcpu)
        return
    hv.sched.set_timer(vcpu, PERIODIC_TIMER, vcpu.periodic_last_event + period, vcpu_periodic_timer_work)


def _park(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    if not vcpu.virq_to_evtchn[VIRQ_TIMER]:
        hv.sched.unbound.add(vcpu)
        return
    parked = hv.sched.parked.setdefault(vcpu.domid, [])
    if vcpu not in parked:
        parked.append(vcpu)


def stop_periodic_timer(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """stop_timer(&v->periodic_timer), parked or armed."""
    hv.sched.stop_timer(vcpu, PERIODIC_TIMER)
    hv.sched.unbound.discard(vcpu)
    parked = hv.sched.parked.get(vcpu.domid)
    if parked and vcpu in parked:
        parked.remove(vcpu)


def unpark_periodic_timers(hv: "Hypervisor", domid: int) -> None:
    """The domain calls: from now on a tick on a pending port may be news again (the guest
    may clear the pending bit)."""
    for vcpu in hv.sched.parked.pop(domid):
        _rearm(hv, vcpu)


def rebind_periodic_timer(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """VIRQ_TIMER was bound on the vCPU: a timer parked while it was unbound ticks again."""
    if vcpu in hv.sched.unbound:
        hv.sched.unbound.discard(vcpu)
        _rearm(hv, vcpu)


def _rearm(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """Arm a parked timer for the first tick after now on its own beat (periodic_last_event
    plus whole periods), where Xen's ticks in between, all no-ops, would have left it."""
    period, last = vcpu.periodic_period, vcpu.periodic_last_event
    vcpu.periodic_last_event = last + (hv.sched.now_ns - last) // period * period
    hv.sched.set_timer(vcpu, PERIODIC_TIMER, vcpu.periodic_last_event + period, vcpu_periodic_timer_work)


def vcpu_set_periodic_timer(hv: "Hypervisor", vcpu: "Vcpu", period_ns: int) -> None:
    """vcpu_set_periodic_timer: stop the timer, take the new period (0 = none) and, if any,
    start it at once whatever the vCPU's state, as Xen does."""
    stop_periodic_timer(hv, vcpu)
    vcpu.periodic_period = period_ns
    vcpu_periodic_timer_work(hv, vcpu)


def vcpu_kick(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """vcpu_kick: the vCPU has new events; unblock it, and poke it even if it is running."""
    vcpu_unblock(hv, vcpu)
    hv.sched.poke(vcpu)


def domain_shutdown(hv: "Hypervisor", domain: "Domain", reason: int) -> None:
    """domain_shutdown (docs/xen.md section 15): the first reason wins and later calls change nothing;
    every vCPU is paused, so each is poked for the adapter to stop it."""
    if domain.shutdown_code is not None:
        return
    domain.shutdown_code = reason
    for vcpu in domain.vcpus:
        vcpu_runstate_change(hv, vcpu)
        hv.sched.poke(vcpu)


def check_running(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """Refuse a call from a vCPU that Xen would not be running. Xen schedules a vCPU only while
    nothing pauses it (vcpu_runnable, xen/include/xen/sched.h): not while _VPF_down is set
    (every vCPU but 0 from creation until VCPUOP_up, and after VCPUOP_down; xen/common/domain.c,
    vcpu_create and common_vcpu_op) and not once domain_shutdown has paused it
    (xen/common/domain.c, domain_shutdown). Such a vCPU executes nothing, so its call changes
    nothing and is neither counted nor traced."""
    domain = hv.domains[vcpu.domid]
    if not vcpu.down and domain.shutdown_code is None:
        return
    who = f"dom{vcpu.domid} vCPU {vcpu.vcpu_id}"
    if domain.shutdown_code is not None:
        raise VcpuNotRunning(
            f"{who} does not run: dom{vcpu.domid} has shut down (code {domain.shutdown_code}) and Xen runs none of its vCPUs again; "
            "the toolstack destroys it (DestroyDomain)"
        )
    if not vcpu.initialised:
        why, remedy = "was never initialised", "brings it up (VCPUOP_initialise, then VCPUOP_up)"
    else:
        why, remedy = "is down (initialised but not yet up, or taken down by VCPUOP_down)", "brings it up with VCPUOP_up"
    raise VcpuNotRunning(f"{who} does not run: it {why}; another vCPU of the domain {remedy}, and its process calls once its Session has received VcpuStarted")
