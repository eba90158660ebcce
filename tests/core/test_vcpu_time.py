"""The periodic timer, runstates and vcpu_info placement (docs/vcpu-time.md sections 5-7):
VCPUOP_set/stop_periodic_timer, get_runstate_info, register_runstate_memory_area and
register_vcpu_info, each errno with the state unchanged, and the references a registered
vcpu_info holds (the fixture audits every test)."""

import pytest

from hypervisor.core import audit
from hypervisor.core.abi import (
    HYPERVISOR_VIRT_START,
    PAGE_SIZE,
    STIME_DELTA_MAX,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    VIRQ_TIMER,
    Errno,
    RUNSTATE_blocked,
    RUNSTATE_offline,
    RUNSTATE_running,
)
from hypervisor.core.sched import BLOCKED

from .conftest import fails_with as fails
from .guest import Guest

MS = 1_000_000


@pytest.fixture
def ticking(hv):
    """A guest whose vCPUs keep the periodic timer Xen gives them."""
    return Guest(hv, ticking=True)


def timer_port(guest, vcpu=0):
    return guest.evtchn("bind_virq", caller=vcpu, virq=VIRQ_TIMER, vcpu=vcpu)


# -- the periodic timer ------------------------------------------------------------------------


def test_every_vcpu_ticks_every_10ms_of_system_time_until_stopped(hv, ticking):
    port = timer_port(ticking)
    assert hv.next_deadline() == 10 * MS
    assert hv.advance_time(10 * MS - 1) == 0 and not ticking.pending(port)
    assert hv.advance_time(10 * MS) == 1 and ticking.pending(port)  # vCPU 1's timer, its VIRQ unbound, is parked
    ticking.clear_pending(port)
    assert hv.next_deadline() == 20 * MS
    hv.advance_time(20 * MS)
    assert ticking.pending(port)
    ticking.clear_pending(port)
    assert ticking.vcpu_op("stop_periodic_timer", 0) == 0 and ticking.vcpu_op("stop_periodic_timer", 1) == 0
    assert hv.next_deadline() is None
    hv.advance_time(100 * MS)
    assert not ticking.pending(port)


def test_set_periodic_timer_restarts_it_with_the_new_period_on_any_vcpu(hv, guest):
    port = timer_port(guest, vcpu=1)
    hv.advance_time(3 * MS)
    assert guest.vcpu_op("set_periodic_timer", 1, caller=0, period_ns=2 * MS) == 0  # another vCPU's: allowed
    assert guest.pending(port)  # a period has passed since the last tick (none, at 0): it ticks at once
    assert hv.sched.timer_expires(guest.domain.vcpus[1], "periodic_timer") == 5 * MS
    guest.clear_pending(port)
    hv.advance_time(5 * MS)
    assert guest.pending(port)


@pytest.mark.parametrize("period", [0, MS - 1, STIME_DELTA_MAX + 1, (1 << 64) - 1])
def test_a_period_below_1ms_or_above_stime_delta_max_is_einval(hv, guest, period):
    with fails(hv, Errno.EINVAL, match="STIME_DELTA_MAX"):
        guest.vcpu_op("set_periodic_timer", 0, period_ns=period)


def test_a_period_of_exactly_1ms_is_taken(hv, guest):
    timer_port(guest)
    assert guest.vcpu_op("set_periodic_timer", 0, period_ns=MS) == 0
    assert hv.next_deadline() == MS


def test_ticks_a_guest_never_takes_park_the_timer_until_the_domain_calls(hv, ticking):
    """A VIRQ is a pending bit: a second tick on a pending port is no news, so the timer stops
    costing wake-ups, and the domain's next call re-arms it on its beat."""
    port = timer_port(ticking)
    ticking.vcpu_op("stop_periodic_timer", 1)
    hv.advance_time(10 * MS)
    assert ticking.pending(port) and hv.next_deadline() == 20 * MS
    assert hv.advance_time(20 * MS) == 1 and hv.next_deadline() is None  # parked
    hv.advance_time(95 * MS)
    ticking.clear_pending(port)
    ticking.call("xen_version")  # any call of the domain
    assert hv.next_deadline() == 100 * MS and not ticking.pending(port)
    hv.advance_time(100 * MS)
    assert ticking.pending(port)


def test_an_unbound_virq_timer_parks_the_timer(hv, ticking):
    assert hv.next_deadline() is None and hv.advance_time(10 * MS) == 0
    port = timer_port(ticking)
    assert hv.next_deadline() == 20 * MS
    hv.advance_time(20 * MS)
    assert ticking.pending(port)


def test_a_blocked_vcpu_does_not_tick_and_ticks_at_once_when_woken_late(hv, ticking):
    """Xen stops a vCPU's periodic timer when it is switched out and, switching it in, ticks at
    once if a period has passed (vcpu_periodic_timer_work)."""
    port = timer_port(ticking)
    ipi = ticking.evtchn("bind_ipi", vcpu=0)
    ticking.vcpu_op("stop_periodic_timer", 1)
    assert ticking.sched_op("block") is BLOCKED
    assert hv.next_deadline() is None
    hv.advance_time(35 * MS)
    assert not ticking.pending(port)
    ticking.evtchn("send", caller=1, port=ipi)
    assert not ticking.domain.vcpus[0].blocked and ticking.pending(port)
    assert hv.next_deadline() == 45 * MS


def test_a_down_vcpu_does_not_tick(hv, ticking):
    port = timer_port(ticking, vcpu=1)
    ticking.vcpu_op("stop_periodic_timer", 0)
    ticking.vcpu_op("down", 1)
    hv.advance_time(50 * MS)
    assert not ticking.pending(port) and hv.next_deadline() is None
    ticking.vcpu_op("up", 1)
    assert ticking.pending(port)


# -- runstates -----------------------------------------------------------------------------------


def runstate(guest, vcpu, caller=0):
    return guest.vcpu_op("get_runstate_info", vcpu, caller=caller)


def test_runstate_times_add_up_to_system_time_since_creation(hv, guest):
    ipi = guest.evtchn("bind_ipi", caller=1, vcpu=1)
    hv.advance_time(4 * MS)
    assert guest.sched_op("block", caller=1) is BLOCKED
    hv.advance_time(10 * MS)
    guest.vcpu_op("down", 1, caller=0)  # blocked dominates offline
    hv.advance_time(12 * MS)
    zero, one = runstate(guest, 0), runstate(guest, 1)
    assert zero == {"state": RUNSTATE_running, "state_entry_time": 0, "time": [12 * MS, 0, 0, 0]}
    assert one == {"state": RUNSTATE_blocked, "state_entry_time": 4 * MS, "time": [4 * MS, 0, 8 * MS, 0]}
    guest.evtchn("send", port=ipi)  # wakes it: down, so offline
    hv.advance_time(15 * MS)
    assert runstate(guest, 1) == {"state": RUNSTATE_offline, "state_entry_time": 12 * MS, "time": [4 * MS, 0, 8 * MS, 3 * MS]}
    assert sum(runstate(guest, 1)["time"]) == 15 * MS


def test_a_vcpu_never_brought_up_is_offline_since_creation(hv):
    hv.advance_time(7 * MS)
    guest = Guest(hv, online=1)
    hv.advance_time(9 * MS)
    assert runstate(guest, 1) == {"state": RUNSTATE_offline, "state_entry_time": 7 * MS, "time": [0, 0, 0, 2 * MS]}


def test_a_paused_domain_is_offline(hv, guest):
    hv.toolstack("pause_domain", domid=guest.domid)
    hv.advance_time(3 * MS)
    hv.toolstack("unpause_domain", domid=guest.domid)
    assert runstate(guest, 0)["time"] == [0, 0, 0, 3 * MS]


def test_the_runstate_area_is_written_at_registration_and_each_change(hv, guest):
    pfn, _ = guest.alloc()
    va = guest.direct_va(pfn) + 8
    hv.advance_time(2 * MS)
    assert guest.vcpu_op("register_runstate_memory_area", 1, addr=va) == 0
    words = [guest.load(va + 8 * i) for i in range(6)]
    assert words == [RUNSTATE_running, 0, 0, 0, 0, 0]  # as of its last change, at creation
    guest.sched_op("block", caller=1)
    hv.advance_time(5 * MS)
    assert [guest.load(va + 8 * i) for i in range(6)] == [RUNSTATE_blocked, 2 * MS, 2 * MS, 0, 0, 0]


def test_a_runstate_area_outside_the_guests_range_is_efault(hv, guest):
    with fails(hv, Errno.EFAULT, match="guest_handle_okay"):
        guest.vcpu_op("register_runstate_memory_area", 0, addr=HYPERVISOR_VIRT_START)
    with fails(hv, Errno.EFAULT):
        guest.vcpu_op("register_runstate_memory_area", 0, addr=(1 << 47) - 8)  # its end is not canonical


def test_an_unmapped_runstate_area_is_taken_and_its_copies_dropped(hv, guest):
    assert guest.vcpu_op("register_runstate_memory_area", 0, addr=0x7000_0000_0000) == 0
    guest.sched_op("block")  # the copy faults, and nothing else happens


# -- register_vcpu_info ---------------------------------------------------------------------------


def counts(hv, mfn):
    info = hv.frame_info(mfn)
    return info["count"], info["type_count"], info["type"]


def test_register_vcpu_info_moves_it_with_its_contents_and_takes_references(hv, guest):
    pfn, mfn = guest.alloc()
    count, tcount, _ = counts(hv, mfn)
    guest.set_upcall_mask(1, 0)
    assert guest.vcpu_op("register_vcpu_info", 1, mfn=mfn, offset=128) == 0
    assert counts(hv, mfn) == (count + 1, tcount + 1, "WRITABLE")
    info = guest.direct_va(pfn) + 128
    # The old contents (mask 0), then every selector bit and upcall-pending, so nothing is lost.
    assert guest.load(info + VCPU_INFO_UPCALL_MASK, size=1) == 0
    assert guest.load(info + VCPU_INFO_PENDING_SEL) == (1 << 64) - 1
    assert guest.load(info + VCPU_INFO_UPCALL_PENDING, size=1) == 1
    assert hv.take_kicks() == [(guest.domid, 1)]
    # From now on events mark the new vcpu_info, and shared info's slot is not looked at.
    guest.store(info + VCPU_INFO_PENDING_SEL, 0)
    guest.store(info + VCPU_INFO_UPCALL_PENDING, 0, size=1)
    port = guest.evtchn("bind_ipi", caller=1, vcpu=1)
    guest.evtchn("send", port=port)
    assert guest.load(info + VCPU_INFO_PENDING_SEL) == 1 << port // 64 and guest.load(info + VCPU_INFO_UPCALL_PENDING, size=1) == 1
    assert guest.pending_sel(1) == 0 and guest.upcall_pending(1) == 0
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=1) == [port]
    assert guest.load(info + VCPU_INFO_UPCALL_MASK, size=1) == 1


def test_a_blocked_vcpu_reads_its_registered_mask(hv, guest):
    _, mfn = guest.alloc()
    guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=0)
    guest.ack_upcall(0)  # shared info's slot is no longer the vCPU's
    assert guest.sched_op("block") == 0  # the registration marked events pending
    assert hv.memory.read(mfn, VCPU_INFO_UPCALL_MASK, 1) == b"\0"


@pytest.mark.parametrize(("offset", "errno"), [(PAGE_SIZE, Errno.EINVAL), (1 << 32, Errno.EINVAL), (PAGE_SIZE - 56, Errno.ENXIO), (4, Errno.ENXIO)])
def test_register_vcpu_info_offset_checks(hv, guest, offset, errno):
    _, mfn = guest.alloc()
    with fails(hv, errno):
        guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=offset)


def test_the_last_vcpu_info_in_a_page_fits(hv, guest):
    _, mfn = guest.alloc()
    assert guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=PAGE_SIZE - 64) == 0


def test_registering_twice_is_ebusy(hv, guest):
    _, mfn = guest.alloc()
    guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=0)
    with fails(hv, Errno.EBUSY):
        guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=64)


def test_another_domains_frame_is_einval(hv, guest, other):
    with fails(hv, Errno.EINVAL, match=f"owned by dom{other.domid}"):
        guest.vcpu_op("register_vcpu_info", 0, mfn=other.alloc()[1], offset=0)
    with fails(hv, Errno.EINVAL):
        guest.vcpu_op("register_vcpu_info", 0, mfn=hv.nr_frames + 5, offset=0)


def test_a_pagetable_frame_is_eacces(hv, guest):
    l1, _ = guest.direct_l1(0)
    with fails(hv, Errno.EACCES, match=f"mfn {l1:#x}"):
        guest.vcpu_op("register_vcpu_info", 0, mfn=l1, offset=0)


def test_a_registered_frame_cannot_become_a_pagetable_and_dies_with_the_domain(hv, guest):
    pfn, mfn = guest.alloc()
    guest.vcpu_op("register_vcpu_info", 1, mfn=mfn, offset=64)
    guest.make_readonly(pfn)
    with fails(hv, Errno.EINVAL):
        guest.pin(1, mfn)
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert hv.frame_info(mfn)["owner"] is None and audit(hv) == []


def test_calls_do_not_wake_a_timer_parked_for_want_of_virq_timer(hv, ticking):
    """Only binding VIRQ_TIMER can make its tick news: a guest that never binds it (most test
    guests, every guest before its kernel boots) never ticks again, however much it calls."""
    hv.advance_time(10 * MS)
    ticking.call("xen_version")
    ticking.evtchn("bind_ipi", vcpu=0)
    assert hv.next_deadline() is None
    port = timer_port(ticking, vcpu=1)
    assert hv.next_deadline() == 20 * MS
    hv.advance_time(20 * MS)
    assert ticking.pending(port)
