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
"""

import heapq
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from .abi import Errno
from .errors import VcpuNotRunning, XenError

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .hypervisor import Hypervisor

TimerFn = Callable[["Hypervisor", "Vcpu"], None]


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

    def __init__(self):
        self.now_ns = 0
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
    hv.sched.poke(vcpu)


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
