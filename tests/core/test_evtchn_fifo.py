"""Event channels, FIFO ABI (docs/xen.md section 24): EVTCHNOP_init_control (with the control-
block checks of XTF's XSA-188 test), expand_array, set_priority, the event words and queues in
guest memory, the switch from 2-level and EVTCHNOP_reset back, and the frames Xen maps."""

import struct

import numpy as np
import pytest

from hypervisor.core import audit, audit_domain
from hypervisor.core.abi import (
    DOMID_SELF,
    EVTCHN_FIFO_BUSY,
    EVTCHN_FIFO_CONTROL_SIZE,
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_PENDING,
    EVTCHN_FIFO_PRIORITY_DEFAULT,
    PAGE_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    VIRQ_TIMER,
    Errno,
    MmuextCmd,
    PageType,
)
from hypervisor.core.evtchn import max_evtchns
from hypervisor.core.evtchn_fifo import MAX_EVENT_ARRAY_PAGES
from hypervisor.core.sched import BLOCKED
from hypervisor.core.trace import restore, snapshot, state_digest
from hypervisor.core.views import evtchn_ports

from .conftest import fails_with as fails
from .conftest import unchanged
from .guest import Guest

PENDING, MASKED, LINKED, BUSY = (1 << b for b in (EVTCHN_FIFO_PENDING, EVTCHN_FIFO_MASKED, EVTCHN_FIFO_LINKED, EVTCHN_FIFO_BUSY))


class Fifo:
    """A guest's side of the FIFO ABI, as Linux's events_fifo.c keeps it: a control block per
    vCPU at offset 0 of its own page, event-array pages, and per-vCPU local queue heads."""

    def __init__(self, guest: Guest, vcpus=(0, 1), pages: int = 1, masked: bool = False):
        self.guest, self.memory = guest, guest.hv.memory
        self.control: dict[int, int] = {}
        for vcpu in vcpus:
            self.init_control(vcpu)
        self.array: list[int] = []
        for _ in range(pages):
            self.expand(masked)

    def init_control(self, vcpu: int) -> None:
        _, mfn = self.guest.alloc()
        assert self.guest.evtchn("init_control", control_gfn=mfn, offset=0, vcpu=vcpu) == {"link_bits": 17}
        self.control[vcpu] = mfn

    def expand(self, masked: bool = False) -> int:
        """evtchn_fifo_setup: a page of words (all MASKED, as Linux's init_array_page, if
        `masked`) given with expand_array."""
        _, mfn = self.guest.alloc()
        if masked:
            self.memory.write(mfn, 0, struct.pack(f"<{PAGE_SIZE // 4}I", *[MASKED] * (PAGE_SIZE // 4)))
        assert self.guest.evtchn("expand_array", array_gfn=mfn) == 0
        self.array.append(mfn)
        return mfn

    def word(self, port: int) -> int:
        return self.guest.fifo_word(port)

    def set_word(self, port: int, value: int) -> None:
        self.guest.set_fifo_word(port, value)

    def ready(self, vcpu: int) -> int:
        return self.memory.entries(self.control[vcpu]).view(np.uint32).item(0)

    def head(self, vcpu: int, priority: int) -> int:
        return self.memory.entries(self.control[vcpu]).view(np.uint32).item(2 + priority)

    def consume(self, vcpu: int) -> list[int]:
        return self.guest.fifo_consume(vcpu)


def enable(guest: Guest, vcpu: int = 0) -> None:
    guest.set_upcall_mask(vcpu, 0)


# -- init_control: the control-block checks (XTF's XSA-188 test) ----------------------------


def test_init_control_on_an_invalid_gfn_is_einval_and_leaves_the_domain_on_two_level(hv, guest):
    """XSA-188: the failed first init_control left Xen a pointer to freed memory, which
    expand_array then used. Xen's answer: EINVAL, then expand_array EOPNOTSUPP."""
    _, page = guest.alloc()
    with fails(hv, Errno.EINVAL, match="map_guest_page"):
        guest.evtchn("init_control", control_gfn=(1 << 64) - 2, offset=0, vcpu=0)
    assert guest.domain.evtchn_fifo is None
    with fails(hv, Errno.EOPNOTSUPP):
        guest.evtchn("expand_array", array_gfn=page)


@pytest.mark.parametrize(
    ("offset", "vcpu", "errno", "match"),
    [
        (0, 2, Errno.ENOENT, "no vCPU 2"),
        (PAGE_SIZE - EVTCHN_FIFO_CONTROL_SIZE + 8, 0, Errno.EINVAL, "across the end"),
        (PAGE_SIZE, 0, Errno.EINVAL, "across the end"),
        (4, 0, Errno.EINVAL, "8-byte aligned"),
    ],
)
def test_init_control_checks_vcpu_offset_and_alignment(hv, guest, offset, vcpu, errno, match):
    _, page = guest.alloc()
    with fails(hv, errno, match=match):
        guest.evtchn("init_control", control_gfn=page, offset=offset, vcpu=vcpu)


def test_a_control_block_may_end_at_the_end_of_its_page(hv, guest):
    _, page = guest.alloc()
    offset = PAGE_SIZE - EVTCHN_FIFO_CONTROL_SIZE
    assert guest.evtchn("init_control", control_gfn=page, offset=offset, vcpu=0) == {"link_bits": 17}
    assert guest.domain.evtchn_fifo.vcpus[0].offset == offset


def test_init_control_twice_for_a_vcpu_is_einval(hv, guest):
    fifo = Fifo(guest, vcpus=(0,), pages=0)
    _, page = guest.alloc()
    with fails(hv, Errno.EINVAL, match="already has its control block"):
        guest.evtchn("init_control", control_gfn=page, offset=0, vcpu=0)
    with fails(hv, Errno.EINVAL, match="already has its control block"):  # the same frame too
        guest.evtchn("init_control", control_gfn=fifo.control[0], offset=0, vcpu=0)


def test_control_block_and_event_array_must_be_the_callers_writable_frames(hv, guest, other):
    _, foreign = other.alloc()
    with fails(hv, Errno.EINVAL, match=f"mfn {foreign:#x}"):
        guest.evtchn("init_control", control_gfn=foreign, offset=0, vcpu=0)
    with fails(hv, Errno.EINVAL, match="map_guest_page"):  # a pinned pagetable: no writable type
        guest.evtchn("init_control", control_gfn=guest.l4, offset=0, vcpu=0)
    Fifo(guest, vcpus=(0,), pages=0)
    with fails(hv, Errno.EINVAL, match=f"mfn {foreign:#x}"):
        guest.evtchn("expand_array", array_gfn=foreign)
    with fails(hv, Errno.EINVAL):
        guest.evtchn("expand_array", array_gfn=hv.frames.nr_frames)


def test_mapped_frames_hold_a_general_and_a_writable_reference_until_reset(hv, guest):
    counts = lambda: {mfn: (int(hv.frames.count[mfn]), int(hv.frames.type_count[mfn])) for mfn in np.flatnonzero(hv.frames.owner == guest.domid).tolist()}  # noqa: E731
    before = counts()
    fifo = Fifo(guest)
    mapped = [*fifo.control.values(), *fifo.array]
    assert {mfn: (c - 1, t - 1) for mfn, (c, t) in counts().items() if mfn in mapped} == {mfn: before[mfn] for mfn in mapped}
    assert all(hv.frames.type[mfn] == PageType.WRITABLE for mfn in mapped)
    array_pfn = int(np.flatnonzero(guest.domain.p2m == fifo.array[0])[0])
    guest.make_readonly(array_pfn)
    with fails(hv, Errno.EINVAL):  # writable while Xen maps it: no pagetable type
        guest.mmuext((MmuextCmd.PIN_L1_TABLE, fifo.array[0]))
    guest.make_writable(array_pfn)
    assert guest.evtchn("reset") == 0
    assert guest.domain.evtchn_fifo is None
    assert counts() == before


# -- expand_array and set_priority ----------------------------------------------------------


def test_expand_array_before_init_control_is_eopnotsupp(hv, guest):
    _, page = guest.alloc()
    with fails(hv, Errno.EOPNOTSUPP, match="2-level"):
        guest.evtchn("expand_array", array_gfn=page)


def test_expand_array_beyond_the_abis_ports_is_enospc(hv, guest):
    fifo = Fifo(guest, vcpus=(0,), pages=1)
    for _ in range(MAX_EVENT_ARRAY_PAGES - 1):  # Xen lets a page be given twice (a reference each)
        assert guest.evtchn("expand_array", array_gfn=fifo.array[0]) == 0
    assert guest.domain.evtchn_fifo.num_evtchns == 1 << 17
    with fails(hv, Errno.ENOSPC, match="131072"):
        guest.evtchn("expand_array", array_gfn=fifo.array[0])


def test_set_priority_errnos(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=0)
    with fails(hv, Errno.ENOSYS, match="2-level"):
        guest.evtchn("set_priority", port=port, priority=3)
    Fifo(guest)
    with fails(hv, Errno.EINVAL, match="beyond its allocated ports"):
        guest.evtchn("set_priority", port=64, priority=3)
    with fails(hv, Errno.EINVAL, match="EVTCHN_FIFO_PRIORITY_MIN"):
        guest.evtchn("set_priority", port=port, priority=16)
    assert guest.evtchn("set_priority", port=port, priority=15) == 0
    assert guest.domain.evtchn[port].priority == 15


# -- delivery and queues ----------------------------------------------------------------------


def test_send_links_the_port_on_its_priority_queue_and_kicks_once(hv, guest):
    fifo = Fifo(guest)
    enable(guest)
    a, b = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(2))
    hv.take_kicks()
    guest.evtchn("send", port=a)
    assert fifo.word(a) == PENDING | LINKED
    assert fifo.head(0, EVTCHN_FIFO_PRIORITY_DEFAULT) == a
    assert fifo.ready(0) == 1 << EVTCHN_FIFO_PRIORITY_DEFAULT
    assert guest.upcall_pending(0) == 1
    assert hv.take_kicks() == [(guest.domid, 0)]
    guest.evtchn("send", port=b)  # appended: a's LINK names b, no second kick
    assert fifo.word(a) == PENDING | LINKED | b
    assert hv.take_kicks() == []
    with unchanged(hv):  # a linked port is not linked again
        guest.evtchn("send", port=a)
    assert fifo.consume(0) == [a, b]
    assert guest.pending_sel(0) == 0  # the 2-level selector is not used


def test_higher_priority_queues_are_consumed_first(hv, guest):
    fifo = Fifo(guest)
    low, mid, high = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(3))
    guest.evtchn("set_priority", port=low, priority=15)
    guest.evtchn("set_priority", port=high, priority=0)
    for port in (low, mid, high):
        guest.evtchn("send", port=port)
    assert fifo.ready(0) == 1 << 0 | 1 << 7 | 1 << 15
    assert fifo.consume(0) == [high, mid, low]


def test_a_queue_the_guest_emptied_starts_again_at_its_head(hv, guest):
    """The tail's word is no longer LINKED (the guest consumed it), so Xen writes the new
    port into the control block's head instead of into the stale tail's LINK."""
    fifo = Fifo(guest)
    a, b = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(2))
    guest.evtchn("send", port=a)
    assert fifo.consume(0) == [a]
    guest.evtchn("send", port=b)
    assert fifo.head(0, EVTCHN_FIFO_PRIORITY_DEFAULT) == b and fifo.word(a) == 0
    assert fifo.consume(0) == [b]


def test_linking_to_a_busy_tail_clears_busy(hv, guest):
    """try_set_link's new word drops BUSY with the old LINK."""
    fifo = Fifo(guest)
    a, b = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(2))
    guest.evtchn("send", port=a)
    fifo.set_word(a, fifo.word(a) | BUSY)
    guest.evtchn("send", port=b)
    assert fifo.word(a) == PENDING | LINKED | b


def test_masked_event_is_pending_only_and_unmask_relinks_it(hv, guest):
    fifo = Fifo(guest, masked=True)
    enable(guest)
    port = guest.evtchn("bind_ipi", vcpu=0)
    hv.take_kicks()
    guest.evtchn("send", port=port)
    assert (fifo.word(port), fifo.ready(0), guest.upcall_pending(0)) == (PENDING | MASKED, 0, 0)
    assert guest.evtchn("unmask", port=port) == 0
    assert fifo.word(port) == PENDING | LINKED
    assert (fifo.head(0, 7), fifo.ready(0), guest.upcall_pending(0)) == (port, 1 << 7, 1)
    assert hv.take_kicks() == [(guest.domid, 0)]


def test_unmask_of_a_port_not_pending_only_clears_masked(hv, guest):
    fifo = Fifo(guest, masked=True)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("unmask", port=port)
    assert (fifo.word(port), fifo.ready(0)) == (0, 0)


def test_moving_a_port_to_another_vcpu_empties_its_old_queue(hv, guest):
    """evtchn_fifo_set_pending: a port that was its old queue's tail is no longer its tail
    once it is linked elsewhere, or the old queue's next event would be linked after it, onto
    the new vCPU's queue."""
    fifo = Fifo(guest)
    a = guest.evtchn("alloc_unbound")
    b = guest.evtchn("bind_ipi", vcpu=0)
    port = guest.evtchn("bind_interdomain", remote_port=a)  # pending at once, on vCPU 0
    assert fifo.consume(0) == [port]  # unlinked; still vCPU 0's tail for Xen
    guest.evtchn("bind_vcpu", port=port, vcpu=1)
    guest.evtchn("send", port=a)
    assert (fifo.head(1, 7), fifo.word(port)) == (port, PENDING | LINKED)
    guest.evtchn("send", port=b)
    assert fifo.head(0, 7) == b and fifo.word(port) & EVTCHN_FIFO_LINK_MASK == 0
    assert fifo.consume(1) == [port] and fifo.consume(0) == [b]


def test_events_for_a_vcpu_without_control_block_stay_pending_only(hv, guest):
    fifo = Fifo(guest, vcpus=(0,))
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.evtchn("send", port=port)
    assert fifo.word(port) == PENDING and guest.upcall_pending(1) == 0


def test_events_before_their_array_page_are_raised_when_it_comes(hv, guest):
    fifo = Fifo(guest, pages=0)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("send", port=port)
    assert guest.domain.evtchn[port].fifo_pending
    fifo.expand()
    assert fifo.word(port) == PENDING | LINKED and fifo.ready(0) == 1 << 7
    assert not guest.domain.evtchn[port].fifo_pending


def test_two_level_pending_ports_carry_over_to_fifo(hv, guest):
    """setup_ports: a port pending in shared info is remembered and raised when its page
    comes; every port takes the default priority."""
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("send", port=port)
    assert guest.pending(port)
    fifo = Fifo(guest)
    assert fifo.word(port) == PENDING | LINKED
    assert fifo.consume(0) == [port]


def test_a_closed_port_still_linked_is_not_reallocated(hv, guest):
    """get_free_port passes over a free port whose word is LINKED (evtchn_is_busy)."""
    fifo = Fifo(guest)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("send", port=port)
    guest.evtchn("close", port=port)
    assert fifo.word(port) == LINKED  # close cleared PENDING only
    assert guest.evtchn("bind_ipi", vcpu=0) == port + 1
    assert fifo.consume(0) == []  # linked but not pending: skipped
    assert guest.evtchn("bind_ipi", vcpu=0) == port


def test_poll_sees_a_fifo_port_pending(hv, guest):
    fifo = Fifo(guest, masked=True)
    port = guest.evtchn("bind_ipi", vcpu=1)
    assert guest.sched_op("poll", caller=1, ports=[port], timeout_ns=0) is BLOCKED
    guest.evtchn("send", port=port)
    assert fifo.word(port) == PENDING | MASKED
    assert not guest.domain.vcpus[1].blocked
    assert guest.sched_op("poll", caller=1, ports=[port], timeout_ns=0) == 0


def test_the_upcall_hint_lists_the_ready_queues_in_consumption_order(hv, guest):
    Fifo(guest)
    enable(guest)
    low, high = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(2))
    guest.evtchn("set_priority", port=high, priority=1)
    guest.evtchn("send", port=low)
    guest.evtchn("send", port=high)
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=0) == [high, low]


def test_fifo_raises_the_port_limit_to_its_abi(hv, guest):
    assert max_evtchns(guest.domain) == 4096
    Fifo(guest, pages=0)
    assert max_evtchns(guest.domain) == 1 << 17


# -- reset and destruction --------------------------------------------------------------------


def test_reset_by_domid_self_goes_back_to_two_level(hv, guest):
    Fifo(guest)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("reset", dom=DOMID_SELF)
    assert guest.domain.evtchn_fifo is None
    assert guest.evtchn("bind_ipi", vcpu=0) == port
    guest.evtchn("send", port=port)
    assert guest.pending(port)
    _, page = guest.alloc()
    with fails(hv, Errno.EOPNOTSUPP):
        guest.evtchn("expand_array", array_gfn=page)
    Fifo(guest)  # and FIFO can be set up again


def test_reset_by_own_numeric_id_closes_ports_but_keeps_fifo(hv, guest):
    """evtchn_reset switches back only for DOMID_SELF, as Xen does."""
    Fifo(guest)
    guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("reset", dom=guest.domid)
    assert guest.domain.evtchn_fifo is not None
    assert guest.domain.evtchn[1].state.name == "FREE"


def test_destroying_a_fifo_domain_frees_every_frame(hv):
    free = hv.frames.free_frames()
    guest = Guest(hv)
    fifo = Fifo(guest)
    guest.evtchn("send", port=guest.evtchn("bind_ipi", vcpu=0))
    result = hv.toolstack("destroy_domain", domid=guest.domid)
    assert "bug" not in result and result["quarantined_frames"] == []
    assert hv.frames.free_frames() == free
    assert all(hv.frames.owner[mfn] == -1 for mfn in [*fifo.control.values(), *fifo.array])


def test_audit_counts_the_mapped_frames(hv, guest):
    fifo = Fifo(guest)
    assert audit(hv) == []
    hv.frames.count[fifo.array[0]] -= 1  # a lost reference is found
    assert any(f"mfn {fifo.array[0]:#x}" in finding for finding in audit(hv))
    hv.frames.count[fifo.array[0]] += 1


def test_the_audit_of_one_domain_counts_its_mapped_frames(hv, guest):
    """audit_domain recounts the domain's own frames: the control blocks and event-array pages
    its event channels map hold their references there too."""
    fifo = Fifo(guest)
    assert audit_domain(hv, guest.domid) == []
    hv.frames.count[fifo.control[1]] -= 1
    assert any(f"mfn {fifo.control[1]:#x}" in finding for finding in audit_domain(hv, guest.domid))
    hv.frames.count[fifo.control[1]] += 1


def test_a_ready_queue_marks_the_vcpu_info_where_register_vcpu_info_moved_it(hv, guest):
    """vcpu_mark_events_pending writes the vCPU's vcpu_info wherever it is: once registered in
    a frame of the guest's, shared info's slot is not looked at, under FIFO as under 2-level."""
    fifo = Fifo(guest)
    pfn, mfn = guest.alloc()
    guest.vcpu_op("register_vcpu_info", 0, mfn=mfn, offset=64)
    info = guest.direct_va(pfn) + 64
    guest.store(info + VCPU_INFO_UPCALL_PENDING, 0, size=1)  # the registration marked events pending
    guest.store(info + VCPU_INFO_UPCALL_MASK, 0, size=1)
    guest.ack_upcall(0)
    hv.take_kicks()
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("send", port=port)
    assert fifo.ready(0) == 1 << EVTCHN_FIFO_PRIORITY_DEFAULT
    assert guest.load(info + VCPU_INFO_UPCALL_PENDING, size=1) == 1 and guest.upcall_pending(0) == 0
    assert hv.take_kicks() == [(guest.domid, 0)]
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=0) == [port]


def test_a_tick_on_a_fifo_port_still_pending_is_no_news_and_parks_the_timer(hv):
    """The periodic timer parks once a tick finds VIRQ_TIMER's event word still PENDING, as it
    does on a 2-level pending bit, and ticks again once the guest consumed it and called."""
    ticking = Guest(hv, ticking=True)
    fifo = Fifo(ticking)
    port = ticking.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    ticking.vcpu_op("stop_periodic_timer", 1)
    hv.advance_time(10 * 1_000_000)
    assert fifo.word(port) == PENDING | LINKED and hv.next_deadline() == 20 * 1_000_000  # news: ticking on
    assert hv.advance_time(20 * 1_000_000) == 1 and hv.next_deadline() is None  # no news: parked
    assert fifo.consume(0) == [port]
    ticking.call("xen_version")  # any call of the domain
    assert hv.next_deadline() == 30 * 1_000_000
    hv.advance_time(30 * 1_000_000)
    assert fifo.word(port) == PENDING | LINKED


def test_queues_link_across_event_array_pages(hv):
    """A queue's tail on the first page links a port on the second; an event for a port
    whose page came later is raised when it comes."""
    guest = Guest(hv, max_evtchn_port=2047)
    fifo = Fifo(guest, pages=1)
    first = guest.evtchn("bind_ipi", vcpu=0)
    while (port := guest.evtchn("alloc_unbound")) < 1024:
        pass
    guest.evtchn("close", port=port)
    second = guest.evtchn("bind_ipi", vcpu=0)
    assert second >= 1024
    guest.evtchn("send", port=first)
    guest.evtchn("send", port=second)  # no page yet: remembered
    assert fifo.word(first) == PENDING | LINKED
    fifo.expand()
    assert fifo.word(first) == PENDING | LINKED | second
    assert fifo.consume(0) == [first, second]


def test_lsevtchn_reads_pending_and_masked_from_the_event_words(hv, guest):
    """views.evtchn_ports (xl lsevtchn, debug key 'e') under FIFO: evtchn_port_is_pending and
    evtchn_port_is_masked read the event word, not shared info."""
    fifo = Fifo(guest, masked=True)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("send", port=port)
    [listed] = [p for p in evtchn_ports(hv, guest.domain) if p["port"] == port]
    assert (listed["pending"], listed["masked"]) == (True, True) and not guest.pending(port)
    fifo.set_word(port, 0)
    [listed] = [p for p in evtchn_ports(hv, guest.domain) if p["port"] == port]
    assert (listed["pending"], listed["masked"]) == (False, False)


def test_a_trace_snapshot_carries_the_fifo_state(hv, guest):
    """A trace started while a domain speaks FIFO replays from a snapshot that holds its
    event array, control blocks, queue tails and port priorities."""
    fifo = Fifo(guest)
    a, b = (guest.evtchn("bind_ipi", vcpu=0) for _ in range(2))
    guest.evtchn("set_priority", port=b, priority=2)
    guest.evtchn("send", port=a)
    copy = restore(snapshot(hv))
    assert state_digest(copy) == state_digest(hv)
    for machine in (hv, copy):
        machine.hypercall(guest.domid, 0, "event_channel_op", cmd="send", port=b)
    assert state_digest(copy) == state_digest(hv) and fifo.head(0, 2) == b


def test_binding_a_port_resets_its_priority(hv, guest):
    """evtchn_port_init (evtchn_fifo_init) on every bind: a priority set while the port was
    free does not carry over."""
    fifo = Fifo(guest)
    port = guest.evtchn("bind_ipi", vcpu=0)
    guest.evtchn("close", port=port)
    guest.evtchn("set_priority", port=port, priority=0)  # any valid port, free ones included
    assert guest.evtchn("bind_ipi", vcpu=0) == port
    guest.evtchn("send", port=port)
    assert fifo.head(0, EVTCHN_FIFO_PRIORITY_DEFAULT) == port and fifo.ready(0) == 1 << EVTCHN_FIFO_PRIORITY_DEFAULT
