"""SCHEDOP, set_timer_op and VCPUOP_set/stop_singleshot_timer (docs/xen.md sections 14,
15): block and poll answer BLOCKED and are woken by kicks, events and timeouts; timers run on
the caller's clock (advance_time)."""

import io

import pytest

from hypervisor.core import Hypervisor
from hypervisor.core.abi import VIRQ_TIMER, Errno, SHUTDOWN_crash, SHUTDOWN_reboot, VCPU_SSHOTTMR_future
from hypervisor.core.sched import BLOCKED
from hypervisor.core.schedop import HUGE_TIMEOUT_FALLBACK_NS, SINGLESHOT_TIMER
from hypervisor.core.trace import TraceWriter, replay

from .conftest import fails_with, refused, unchanged
from .conftest import fails_with as fails  # the errno, and nothing changed
from .guest import Guest


def vcpu(guest, n):
    return guest.domain.vcpus[n]


def test_yield_returns_at_once(hv, guest):
    with unchanged(hv):
        assert guest.sched_op("yield") == 0


# -- block -----------------------------------------------------------------------------------


def test_block_enables_events_then_sleeps_until_an_event_kicks_it(hv, guest):
    ipi = guest.evtchn("bind_ipi", vcpu=1)
    guest.set_upcall_mask(1, 1)
    assert guest.sched_op("block", caller=1) is BLOCKED
    assert guest.upcall_mask(1) == 0 and vcpu(guest, 1).blocked and vcpu(guest, 1).info()["blocked"]
    guest.evtchn("send", port=ipi)
    assert not vcpu(guest, 1).blocked and hv.take_kicks() == [(guest.domid, 1)]


def test_block_with_an_upcall_pending_returns_at_once(hv, guest):
    """The no-lost-wakeup rule: the upcall came while the guest was still masked."""
    ipi = guest.evtchn("bind_ipi", vcpu=0)
    guest.set_upcall_mask(0, 1)
    guest.evtchn("send", port=ipi)
    hv.take_kicks()
    assert guest.sched_op("block") == 0
    assert guest.upcall_mask(0) == 0 and not vcpu(guest, 0).blocked and hv.take_kicks() == []


def test_a_masked_port_does_not_wake_a_blocked_vcpu(hv, guest):
    ipi = guest.evtchn("bind_ipi", vcpu=0)
    guest.mask(ipi)
    guest.sched_op("block")
    guest.evtchn("send", port=ipi, caller=1)
    assert vcpu(guest, 0).blocked and hv.take_kicks() == []
    guest.evtchn("unmask", port=ipi, caller=1)
    assert not vcpu(guest, 0).blocked and hv.take_kicks() == [(guest.domid, 0)]


def test_a_block_inside_a_multicall_wakes_at_once(hv, guest):
    results = guest.call("multicall", calls=[{"op": "sched_op", "args": {"cmd": "block"}}, {"op": "sched_op", "args": {"cmd": "yield"}}])
    assert results == [{"result": 0}, {"result": 0}] and not vcpu(guest, 0).blocked


# -- poll ------------------------------------------------------------------------------------


def test_poll_sleeps_and_is_woken_by_its_masked_port(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.mask(port)
    assert guest.sched_op("poll", ports=[port]) is BLOCKED
    assert vcpu(guest, 0).poll_evtchn == port and guest.domain.poll_mask == {0}
    guest.evtchn("send", port=port, caller=1)
    assert not vcpu(guest, 0).blocked and vcpu(guest, 0).poll_evtchn == 0 and guest.domain.poll_mask == set()
    assert guest.upcall_pending(0) == 0 and hv.take_kicks() == [(guest.domid, 0)]  # woken, no upcall


def test_poll_returns_at_once_if_a_listed_port_is_pending(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)  # pending for vCPU 1, masked: vCPU 0 has no upcall
    guest.mask(port)
    guest.evtchn("send", port=port)
    with unchanged(hv):
        assert guest.sched_op("poll", ports=[port]) == 0


def test_poll_returns_at_once_if_an_upcall_is_deliverable_even_with_bad_ports(hv, guest):
    guest.set_upcall_mask(0, 0)  # local_irq_enable
    guest.evtchn("send", port=guest.evtchn("bind_ipi", vcpu=0))
    hv.take_kicks()
    with unchanged(hv):
        assert guest.sched_op("poll", ports=[4000]) == 0


def test_poll_of_one_port_ignores_the_others(hv, guest):
    watched, other = guest.evtchn("bind_ipi", vcpu=1), guest.evtchn("bind_ipi", vcpu=1)
    guest.sched_op("poll", ports=[watched])
    guest.evtchn("send", port=other)
    assert vcpu(guest, 0).blocked and hv.take_kicks() == [(guest.domid, 1)]


def test_poll_of_several_ports_is_woken_by_any_port_of_the_domain(hv, guest):
    """Xen records only "several" (poll_evtchn -1), so any port going pending wakes it."""
    a, b, unrelated = (guest.evtchn("bind_ipi", vcpu=1) for _ in range(3))
    guest.sched_op("poll", ports=[a, b])
    assert vcpu(guest, 0).poll_evtchn == -1
    guest.evtchn("send", port=unrelated)
    assert not vcpu(guest, 0).blocked


def test_poll_is_ended_by_a_kick(hv, guest):
    watched, ipi = guest.evtchn("bind_ipi", vcpu=1), guest.evtchn("bind_ipi", vcpu=0)
    guest.sched_op("poll", ports=[watched])
    guest.evtchn("send", port=ipi, caller=1)  # an upcall for vCPU 0 unblocks it
    assert not vcpu(guest, 0).blocked and guest.domain.poll_mask == set()


def test_poll_errors(hv, guest):
    pending = guest.evtchn("bind_ipi", vcpu=1)
    guest.mask(pending)
    guest.evtchn("send", port=pending)
    with fails(hv, Errno.EINVAL, match="at most 128"):
        guest.sched_op("poll", ports=[pending] * 129)
    for port, match in ((64, "beyond"), (9, "is free"), (0, "is reserved")):
        with fails(hv, Errno.EINVAL, match=match):
            guest.sched_op("poll", ports=[port])
    with fails(hv, Errno.EINVAL):  # the bad port comes first
        guest.sched_op("poll", ports=[9, pending])
    with unchanged(hv):  # the pending port comes first and decides
        assert guest.sched_op("poll", ports=[pending, 9]) == 0


def test_poll_times_out_at_its_absolute_deadline(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    hv.advance_time(1_000)
    assert guest.sched_op("poll", ports=[port], timeout_ns=5_000) is BLOCKED
    assert hv.next_deadline() == 5_000
    assert hv.advance_time(4_999) == 0 and vcpu(guest, 0).blocked
    assert hv.advance_time(5_000) == 1
    assert not vcpu(guest, 0).blocked and hv.take_kicks() == [(guest.domid, 0)] and hv.next_deadline() is None


def test_poll_with_a_past_deadline_returns_at_once(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    hv.advance_time(10_000)
    assert guest.sched_op("poll", ports=[port], timeout_ns=9_000) == 0
    assert not vcpu(guest, 0).blocked and guest.domain.poll_mask == set()


@pytest.mark.parametrize("deadline", [1 << 63, 2**64 - 1])
def test_a_poll_deadline_negative_to_xen_returns_at_once(hv, guest, deadline):
    """Xen's timers take an s_time_t: a u64 deadline of 2**63 or more is in the past."""
    port = guest.evtchn("bind_ipi", vcpu=1)
    hv.advance_time(1_000)
    assert guest.sched_op("poll", ports=[port], timeout_ns=deadline) == 0
    assert not vcpu(guest, 0).blocked and hv.next_deadline() is None


def test_a_stale_poll_timer_cannot_wake_a_later_block(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.sched_op("poll", ports=[port], timeout_ns=5_000)
    guest.evtchn("send", port=port)  # ends the poll; its timer stays armed, as in Xen
    hv.take_kicks()
    guest.clear_pending(port)
    assert guest.sched_op("block") is BLOCKED
    hv.advance_time(5_000)
    assert vcpu(guest, 0).blocked and hv.take_kicks() == []


# -- shutdown --------------------------------------------------------------------------------


def test_shutdown_records_the_reason_and_pauses_every_vcpu(hv, guest):
    assert guest.sched_op("shutdown", reason=SHUTDOWN_reboot) == 0
    assert guest.domain.shutdown_code == SHUTDOWN_reboot
    assert hv.take_kicks() == [(guest.domid, 0), (guest.domid, 1)]
    with refused(hv, match="has shut down (code 1)"):  # paused: no vCPU calls again
        guest.sched_op("shutdown", reason=SHUTDOWN_crash, caller=1)


def test_shutdown_reason_is_not_checked_and_keeps_its_low_byte(guest):
    guest.sched_op("shutdown", reason=0x1FF)
    assert guest.domain.shutdown_code == 0xFF


def test_unknown_sched_op_is_enosys(hv, guest):
    with fails(hv, Errno.ENOSYS):
        guest.sched_op("remote_shutdown", domain_id=1, reason=0)


# -- set_timer_op and VIRQ_TIMER --------------------------------------------------------------


def test_timer_raises_virq_timer_on_its_vcpu_when_time_passes(hv, guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    assert guest.call("set_timer_op", 1, timeout_ns=1_000) == 0
    assert hv.next_deadline() == 1_000
    assert hv.advance_time(999) == 0 and not guest.pending(port)
    assert hv.advance_time(1_500) == 1
    assert guest.pending(port) and guest.upcall_pending(1) == 1 and hv.take_kicks() == [(guest.domid, 1)]
    assert hv.next_deadline() is None and hv.advance_time(10**9) == 0  # single-shot


def test_timer_wakes_a_blocked_vcpu(hv, guest):
    guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    guest.call("set_timer_op", timeout_ns=2_000)
    assert guest.sched_op("block") is BLOCKED
    hv.advance_time(2_000)
    assert not vcpu(guest, 0).blocked


def test_set_timer_op_rearms_and_zero_stops(hv, guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    guest.call("set_timer_op", timeout_ns=100)
    guest.call("set_timer_op", timeout_ns=500)  # later: the deadline at 100 is gone
    assert hv.next_deadline() == 500 and hv.advance_time(100) == 0 and not guest.pending(port)
    for deadline in range(10_000, 0, -1):  # re-armed many times: only the last one counts
        guest.call("set_timer_op", timeout_ns=10_000 + deadline)
    assert hv.next_deadline() == 10_001
    assert len(hv.sched._heap) <= 2 + 64  # replaced deadlines do not pile up
    guest.call("set_timer_op", timeout_ns=0)
    assert hv.next_deadline() is None and hv.advance_time(10**6) == 0 and not guest.pending(port)


def test_timers_of_several_vcpus_fire_in_deadline_order(hv, guest, other):
    fired = []
    for g in (guest, other):
        for n in (0, 1):
            g.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=n)
    guest.call("set_timer_op", 1, timeout_ns=300)
    other.call("set_timer_op", 0, timeout_ns=100)
    guest.call("set_timer_op", 0, timeout_ns=200)
    hv.advance_time(250)
    fired += hv.take_kicks()
    hv.advance_time(300)
    fired += hv.take_kicks()
    assert fired == [(other.domid, 0), (guest.domid, 0), (guest.domid, 1)]


def test_a_deadline_in_the_past_fires_at_once(hv, guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    hv.advance_time(50_000)
    guest.call("set_timer_op", timeout_ns=1)
    assert guest.pending(port) and hv.next_deadline() is None


@pytest.mark.parametrize("timeout", [(1 << 63) + 5, 1_000 + (1 << 50)])
def test_a_negative_or_huge_deadline_fires_in_100ms(hv, guest, timeout):
    hv.advance_time(1_000)
    guest.call("set_timer_op", timeout_ns=timeout)
    assert hv.next_deadline() == 1_000 + HUGE_TIMEOUT_FALLBACK_NS


def test_a_timer_without_virq_timer_fires_silently(hv, guest):
    guest.call("set_timer_op", timeout_ns=10)
    shared = hv.memory.read(guest.domain.shared_info_mfn, 0, 4096)
    assert hv.advance_time(10) == 1 and hv.take_kicks() == []
    assert hv.memory.read(guest.domain.shared_info_mfn, 0, 4096) == shared


# -- VCPUOP_set_singleshot_timer / stop_singleshot_timer: the same timer ----------------------


def singleshot(guest, timeout_abs_ns, vcpu=0, caller=0, flags=0):
    return guest.vcpu_op("set_singleshot_timer", vcpu, caller=caller, timeout_abs_ns=timeout_abs_ns, flags=flags)


def test_singleshot_timer_raises_virq_timer_at_its_absolute_deadline(hv, guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    hv.advance_time(1_000)
    assert singleshot(guest, 5_000, vcpu=1, caller=1) == 0
    assert hv.next_deadline() == 5_000 and hv.advance_time(4_999) == 0 and not guest.pending(port)
    assert hv.advance_time(5_000) == 1
    assert guest.pending(port) and hv.take_kicks() == [(guest.domid, 1)] and hv.next_deadline() is None


def test_singleshot_timer_and_set_timer_op_are_one_timer(hv, guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    guest.call("set_timer_op", timeout_ns=100)
    singleshot(guest, 500)  # replaces set_timer_op's deadline
    assert hv.next_deadline() == 500 and hv.advance_time(100) == 0 and not guest.pending(port)
    guest.call("set_timer_op", timeout_ns=300)  # and the other way round
    assert hv.next_deadline() == 300
    assert guest.vcpu_op("stop_singleshot_timer", 0) == 0  # stops what set_timer_op armed
    assert hv.next_deadline() is None and hv.advance_time(10_000) == 0 and not guest.pending(port)


@pytest.mark.parametrize("flags", [0, VCPU_SSHOTTMR_future])
@pytest.mark.parametrize("deadline", [1, 9_999, 1 << 63, 2**64 - 1])
def test_a_singleshot_deadline_already_past_fires_at_once_whatever_the_flags(hv, guest, flags, deadline):
    """Since Xen 4.18 VCPU_SSHOTTMR_future is ignored: never -ETIME, the event comes at once
    and the pending deadline is gone. 2**63 and more are negative to Xen's s_time_t."""
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    hv.advance_time(10_000)
    singleshot(guest, 20_000)
    assert singleshot(guest, deadline, flags=flags) == 0
    assert guest.pending(port) and hv.next_deadline() is None


@pytest.mark.parametrize("cmd, fields", [("set_singleshot_timer", {"timeout_abs_ns": 5_000}), ("stop_singleshot_timer", {})])
def test_singleshot_ops_on_another_vcpu_are_einval(hv, guest, cmd, fields):
    guest.vcpu_op("set_singleshot_timer", 1, caller=1, timeout_abs_ns=7_000)
    with fails(hv, Errno.EINVAL, match="a vCPU sets only its own timer"):
        guest.vcpu_op(cmd, 1, **fields)
    with fails(hv, Errno.ENOENT):  # a vCPU that does not exist is ENOENT first
        guest.vcpu_op(cmd, 2, **fields)
    assert hv.sched.timer_expires(guest.domain.vcpus[1], SINGLESHOT_TIMER) == 7_000


def test_time_cannot_go_back(hv):
    hv.advance_time(100)
    with fails_with(hv, Errno.EINVAL, match="cannot go back"):
        hv.advance_time(99)


def test_destroying_a_domain_kills_its_timers_and_kicks(hv, guest, other):
    guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    guest.call("set_timer_op", timeout_ns=100)
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.sched_op("poll", ports=[port], timeout_ns=200)
    guest.sched_op("shutdown", reason=0, caller=1)
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert hv.next_deadline() is None and hv.take_kicks() == []
    assert hv.advance_time(1_000) == 0


# -- replay ----------------------------------------------------------------------------------


def test_a_trace_of_blocking_and_time_replays_exactly():
    hv = Hypervisor(nr_frames=1 << 12)
    out = io.BytesIO()
    writer = TraceWriter(hv, out)
    hv.tracer = writer
    guest = Guest(hv, nr_pages=256)
    port = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    guest.call("set_timer_op", 1, timeout_ns=500)
    assert guest.sched_op("block", caller=1) is BLOCKED
    hv.advance_time(500)
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=1) == [port]
    writer.close()
    report, twin = replay(io.BytesIO(out.getvalue()))
    assert report.ok and report.digest_matched and report.calls == writer.calls
    assert twin.domains[guest.domid].vcpus[1].blocked is False
