"""HYPERVISOR_sched_op and set_timer_op (docs/xen.md section 15): yield, block, poll,
shutdown, and the vCPU's single-shot timer that raises VIRQ_TIMER.

block and poll answer `sched.BLOCKED` when the vCPU goes to sleep; the adapter holds the call
until the vCPU is unblocked and then answers 0, as Xen does. Deadlines are absolute ns on the
caller's clock (`Hypervisor.advance_time`).
"""

from typing import TYPE_CHECKING

from .abi import VIRQ_TIMER, Errno
from .errors import XenError
from .evtchn import evtchn_port_poll, local_events_need_delivery, send_guest_vcpu_virq, set_upcall_mask
from .sched import BLOCKED, Blocked, domain_shutdown, run_timers, s_time, vcpu_runstate_change, vcpu_unblock

if TYPE_CHECKING:
    from .domain import Vcpu
    from .hypervisor import Hypervisor

MAX_POLL_PORTS = 128  # do_poll's "fairly arbitrary limit"
SINGLESHOT_TIMER, POLL_TIMER = "singleshot_timer", "poll_timer"
HUGE_TIMEOUT_NS = 1 << 50  # do_set_timer_op: further ahead than ~13 days is a guest bug...
HUGE_TIMEOUT_FALLBACK_NS = 100_000_000  # ...so the timer fires in 100 ms instead


def sched_op(hv: "Hypervisor", current: "Vcpu", cmd: str, **fields) -> int | Blocked:
    """HYPERVISOR_sched_op: `cmd` names the SCHEDOP_* ("yield", "block", "shutdown", "poll")
    and `fields` its struct's fields. Returns 0, or BLOCKED for a vCPU that now sleeps."""
    handler = SCHEDOP.get(cmd)
    if handler is None:
        raise XenError(Errno.ENOSYS, f"unknown sched_op {cmd!r} (xensim has {', '.join(SCHEDOP)})")
    return handler(hv, current, **fields)


def sched_yield(hv: "Hypervisor", current: "Vcpu") -> int:
    """SCHEDOP_yield: the adapter's scheduler runs the vCPUs; the core has nothing to do."""
    return 0


def block(hv: "Hypervisor", current: "Vcpu") -> int | Blocked:
    """SCHEDOP_block: enable event delivery (upcall mask 0), then sleep unless an upcall is
    already deliverable, so a wake-up between the guest's check and the call is never lost."""
    set_upcall_mask(hv, current, False)
    if local_events_need_delivery(hv, current):
        return 0
    current.blocked = True
    vcpu_runstate_change(hv, current)
    return BLOCKED


def poll(hv: "Hypervisor", current: "Vcpu", ports: list[int] = (), timeout_ns: int = 0) -> int | Blocked:
    """SCHEDOP_poll: return at once if an upcall is deliverable or a listed port is pending;
    ports are examined in order and the first decisive one wins (an unusable port is EINVAL).
    Otherwise sleep until a listed port becomes pending, masked or not, or until the absolute
    deadline `timeout_ns` (0 = none; one already past, 2**63 and above included, ends the poll
    at once). With several ports any port of the domain that becomes pending wakes the vCPU,
    as in Xen."""
    if len(ports) > MAX_POLL_PORTS:
        raise XenError(Errno.EINVAL, f"poll of {len(ports)} ports: at most {MAX_POLL_PORTS}")
    domain = hv.domains[current.domid]
    if local_events_need_delivery(hv, current) or any(evtchn_port_poll(hv, domain, port) for port in ports):
        return 0
    current.blocked = True
    current.poll_evtchn = ports[0] if len(ports) == 1 else -1
    domain.poll_mask.add(current.vcpu_id)
    vcpu_runstate_change(hv, current)
    if timeout_ns:
        hv.sched.set_timer(current, POLL_TIMER, s_time(timeout_ns), poll_timer_fn)
        run_timers(hv)
    return BLOCKED if current.blocked else 0


def poll_timer_fn(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """The poll timeout: end the poll if the vCPU is still polling. A timer left from an
    earlier poll may end a later poll without timeout early; Xen has the same spurious wake."""
    if vcpu.vcpu_id in hv.domains[vcpu.domid].poll_mask:
        vcpu_unblock(hv, vcpu)


def shutdown(hv: "Hypervisor", current: "Vcpu", reason: int) -> int:
    """SCHEDOP_shutdown: the reason is not checked (Xen keeps its low byte); the first wins."""
    domain_shutdown(hv, hv.domains[current.domid], reason & 0xFF)
    return 0


SCHEDOP = {"yield": sched_yield, "block": block, "shutdown": shutdown, "poll": poll}


def set_timer_op(hv: "Hypervisor", current: "Vcpu", timeout_ns: int) -> int:
    """HYPERVISOR_set_timer_op: arm the vCPU's single-shot timer at the absolute deadline
    `timeout_ns` (0 stops it); a deadline in the past fires at once. Like Xen, a deadline that
    is negative as an s64 or more than 2**50 ns ahead fires in 100 ms instead."""
    now = hv.sched.now_ns
    if timeout_ns == 0:
        hv.sched.stop_timer(current, SINGLESHOT_TIMER)
        return 0
    if not 0 < timeout_ns < 1 << 63 or timeout_ns - now >= HUGE_TIMEOUT_NS:
        timeout_ns = now + HUGE_TIMEOUT_FALLBACK_NS
    arm_singleshot_timer(hv, current, timeout_ns)
    return 0


def arm_singleshot_timer(hv: "Hypervisor", vcpu: "Vcpu", expires_ns: int) -> None:
    """set_timer(&v->singleshot_timer, expires): the one timer that set_timer_op and
    VCPUOP_set_singleshot_timer share. A deadline already reached fires before the call
    returns, as Xen's TIMER_SOFTIRQ runs before the return to the guest."""
    hv.sched.set_timer(vcpu, SINGLESHOT_TIMER, expires_ns, send_timer_event)
    run_timers(hv)


def send_timer_event(hv: "Hypervisor", vcpu: "Vcpu") -> bool:
    """A timer fired (the single-shot or the periodic one): VIRQ_TIMER on this vCPU, if it
    bound one. Returns whether the event was news (sched.vcpu_periodic_timer_work)."""
    return send_guest_vcpu_virq(hv, vcpu, VIRQ_TIMER)
