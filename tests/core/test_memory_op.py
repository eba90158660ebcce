"""HYPERVISOR_memory_op (docs/xen.md section 23; xen/common/memory.c do_memory_op,
increase_reservation, decrease_reservation, populate_physmap, memory_exchange,
guest_remove_page): counts, errnos, limits, preemption, and a failure that changes nothing."""

import numpy as np
import pytest

from hypervisor.core import Continuation, Hypervisor, XenError, audit, audit_domain
from hypervisor.core.abi import DOMID_SELF, INVALID_M2P, INVALID_MFN, PAGE_SHIFT, RO_MPT_VIRT_START, Errno, MmuextCmd
from hypervisor.core.domain import MAXMEM_SLACK_PAGES
from hypervisor.core.memop import DOMU_MAX_ORDER
from hypervisor.core.trace import state_digest

from .conftest import fails_with, unchanged
from .guest import Guest


def memop(guest, cmd, vcpu=0, **fields):
    """The call's final answer, resumed until it is over as the server does."""
    answer, _ = guest.go_on(guest.call("memory_op", vcpu, cmd=cmd, **fields), vcpu)
    return answer


def give_back(guest, mfns, **kw):
    return memop(guest, "decrease_reservation", extent_start=list(mfns), nr_extents=len(mfns), **kw)


def spare_pages(guest, n):
    """n pfns the guest does not use, their frames held by nothing but the allocation."""
    return [guest.alloc() for _ in range(n)]


def test_stats(hv, guest):
    assert memop(guest, "current_reservation") == {"result": 2048}
    assert memop(guest, "maximum_reservation", domid=guest.domid) == {"result": 2048 + MAXMEM_SLACK_PAGES}
    assert memop(guest, "maximum_ram_page") == {"result": hv.nr_frames}


def test_stats_of_another_domain(hv, guest, other):
    with fails_with(hv, Errno.EPERM, match="xsm_memory_stat_reservation"):
        memop(guest, "current_reservation", domid=other.domid)
    with fails_with(hv, Errno.ESRCH):
        memop(guest, "maximum_reservation", domid=999)
    other.domain.privileged = True
    assert memop(other, "current_reservation", domid=guest.domid) == {"result": 2048}


def test_unknown_op_is_enosys(hv, guest):
    with fails_with(hv, Errno.ENOSYS):
        memop(guest, 7)


def test_decrease_frees_and_scrubs(hv, guest):
    (pfn, mfn), (pfn2, mfn2) = spare_pages(guest, 2)
    hv.memory.write(mfn, 0, b"secret")
    guest.load(guest.direct_va(pfn))  # a TLB entry for the page, which freeing must drop
    free = hv.frames.free_frames()
    answer = give_back(guest, [mfn, mfn2])
    assert answer["result"] == 2 and answer["stopped"] == ""
    assert hv.frames.free_frames() == free  # still mapped in the direct map: freed on the last put
    assert memop(guest, "current_reservation")["result"] == 2048
    guest.set_entry(*guest.direct_l1(pfn), 0)
    guest.set_entry(*guest.direct_l1(pfn2), 0)
    assert hv.frames.free_frames() == free + 2
    assert hv.memory.read(mfn, 0, 6) == bytes(6) and hv.m2p[mfn] == INVALID_M2P
    assert guest.load(RO_MPT_VIRT_START + 8 * mfn) == INVALID_M2P
    assert memop(guest, "current_reservation")["result"] == 2046
    assert guest.domain.p2m[pfn] == INVALID_MFN
    assert not any(v.tlb.maps(mfn) for v in guest.domain.vcpus)


def test_decrease_stops_at_the_first_bad_frame(hv, guest, other):
    """ENXIO for a frame of another domain, EINVAL past RAM: the count of extents done, the
    bad one and those after it untouched (Xen's `goto out`)."""
    (_, mine), (_, after) = spare_pages(guest, 2)
    for bad, why in ((other.mfn(40), "ENXIO"), (hv.nr_frames + 1, "EINVAL"), (guest.domain.shared_info_mfn, "ENXIO")):
        before = state_digest(hv)
        answer = give_back(guest, [bad, after])
        assert answer["result"] == 0 and answer["stopped"].startswith(f"{why}: extent 0"), answer
        assert state_digest(hv) == before
    answer = give_back(guest, [mine, other.mfn(40), after])
    assert answer["result"] == 1 and "owned by dom" in answer["stopped"]
    assert hv.frames.owner[after] == guest.domid and hv.frames.owner[other.mfn(40)] == other.domid


def test_decrease_of_another_domain_needs_privilege(hv, guest, other):
    victim = other.mfn(40)
    with unchanged(hv):
        answer = give_back(guest, [victim], domid=other.domid)
    assert answer["result"] == 0 and "xsm_memory_adjust_reservation" in answer["stopped"]
    with unchanged(hv):
        assert give_back(guest, [victim])["result"] == 0  # DOMID_SELF: not the caller's frame


def test_order_and_list_limits(hv, guest):
    (_, mfn), *_ = spare_pages(guest, 1)
    with unchanged(hv):
        answer = memop(guest, "decrease_reservation", extent_start=[mfn], nr_extents=1, extent_order=DOMU_MAX_ORDER + 1)
        assert answer["result"] == 0 and "extent order" in answer["stopped"]
        answer = memop(guest, "decrease_reservation", extent_start=[mfn], nr_extents=2)
        assert answer["result"] == 0 and "guest_handle_subrange_okay" in answer["stopped"]
        answer = memop(guest, "increase_reservation", nr_extents=1 << 26)
        assert answer["result"] == 0 and "continuation" in answer["stopped"]
        answer = memop(guest, "populate_physmap", extent_start=[5], nr_extents=1, mem_flags=12)
        assert answer["result"] == 0 and "address bits" in answer["stopped"]


def test_increase_up_to_max_pages(hv, guest):
    room = guest.domain.max_pages - 2048
    answer = memop(guest, "increase_reservation", extent_start=[0] * (room + 3), nr_extents=room + 3)
    assert answer["result"] == room and answer["stopped"].startswith("E2BIG")
    got = answer["extent_start"][:room]
    assert (hv.frames.owner[got] == guest.domid).all() and (hv.m2p[got] == INVALID_M2P).all()
    assert answer["extent_start"][room:] == [0, 0, 0]
    assert memop(guest, "current_reservation")["result"] == guest.domain.max_pages


def test_increase_with_a_null_list_reports_nothing(hv, guest):
    answer = memop(guest, "increase_reservation", nr_extents=4)
    assert answer == {"result": 4, "stopped": "", "extent_start": []}
    assert memop(guest, "current_reservation")["result"] == 2052


def test_populate_sets_the_m2p_and_an_aligned_extent(hv, guest):
    (pfn, mfn), *_ = spare_pages(guest, 1)
    give_back(guest, [mfn])
    guest.set_entry(*guest.direct_l1(pfn), 0)
    answer = memop(guest, "populate_physmap", extent_start=[pfn], nr_extents=1)
    new = answer["extent_start"][0]
    assert answer["result"] == 1 and hv.m2p[new] == pfn and guest.domain.p2m[pfn] == new
    assert guest.load(RO_MPT_VIRT_START + 8 * new) == pfn
    assert hv.memory.entries(new).any() == False  # noqa: E712 - a scrubbed frame
    big = memop(guest, "populate_physmap", extent_start=[0x10000], nr_extents=1, extent_order=4)
    first = big["extent_start"][0]
    assert first % 16 == 0 and hv.m2p[first : first + 16].tolist() == list(range(0x10000, 0x10010))


def test_populate_on_demand_on_oneself_does_nothing(hv, guest):
    with unchanged(hv):
        answer = memop(guest, "populate_physmap", extent_start=[5], nr_extents=1, mem_flags=1 << 16)
    assert answer["result"] == 0


def test_machine_out_of_memory_stops(hv):
    small = Hypervisor(nr_frames=2048 + 16 + 64)
    g = Guest(small, nr_pages=2048)
    free = small.frames.free_frames()
    answer = memop(g, "increase_reservation", nr_extents=200)
    assert answer["stopped"].startswith("ENOMEM") and answer["result"] == free < 200
    assert small.frames.free_frames() == 0
    assert audit(small) == []


def test_long_calls_are_preempted_and_go_on(hv, guest):
    small = Hypervisor(nr_frames=1 << 14, preempt_work=64 * 32)
    g = Guest(small)
    first = g.call("memory_op", cmd="increase_reservation", extent_start=[0] * 200, nr_extents=200)
    assert isinstance(first, Continuation) and 0 < first.at["start"] < 200
    answer, stops = g.go_on(first)
    assert answer["result"] == 200 and len(set(answer["extent_start"])) == 200 and len(stops) >= 3
    back = g.call("memory_op", cmd="decrease_reservation", extent_start=answer["extent_start"], nr_extents=200)
    answer, _ = g.go_on(back)
    assert answer["result"] == 200 and small.tot_pages(g.domid) == 2048
    assert audit(small) == []


# -- exchange ---------------------------------------------------------------------------------------


def exchange(guest, ins, outs, nr_exchanged=0, in_order=0, out_order=0, **kw):
    return memop(
        guest,
        "exchange",
        input={"extent_start": ins, "nr_extents": kw.get("nr_in", len(ins)), "extent_order": in_order, "domid": kw.get("in_domid", DOMID_SELF)},
        output={"extent_start": outs, "nr_extents": kw.get("nr_out", len(outs)), "extent_order": out_order, "domid": kw.get("out_domid", DOMID_SELF), "mem_flags": kw.get("mem_flags", 0)},
        nr_exchanged=nr_exchanged,
    )


def unmapped_pages(guest, n):
    pages = spare_pages(guest, n)
    for pfn, _ in pages:
        guest.set_entry(*guest.direct_l1(pfn), 0)
    return pages


def test_exchange_for_a_contiguous_extent(hv, guest):
    """Linux's xen_create_contiguous_region: 4 frames out, one order-2 extent in their place."""
    pages = unmapped_pages(guest, 4)
    pfns, mfns = [p for p, _ in pages], [m for _, m in pages]
    answer = exchange(guest, mfns, [pfns[0]], out_order=2)
    new = answer["extent_start"][0]
    assert answer["result"] == 0 and answer["nr_exchanged"] == 4 and new % 4 == 0
    assert hv.m2p[new : new + 4].tolist() == pfns and (hv.m2p[mfns] == INVALID_M2P).all()
    assert (hv.frames.owner[mfns] == -1).all() and memop(guest, "current_reservation")["result"] == 2048


def test_exchange_rules(hv, guest, other):
    pages = unmapped_pages(guest, 2)
    mfns = [m for _, m in pages]
    with fails_with(hv, Errno.EPERM, done=0):
        exchange(guest, mfns, [1], out_order=DOMU_MAX_ORDER + 1)
    with fails_with(hv, Errno.EINVAL, done=0, match="differ"):
        exchange(guest, mfns, [1, 2], out_domid=guest.domid)
    with fails_with(hv, Errno.EINVAL, match="are not"):
        exchange(guest, mfns, [1])
    with fails_with(hv, Errno.EFAULT, done=0):
        exchange(guest, mfns, [1], nr_out=2)
    with fails_with(hv, Errno.ESRCH):
        exchange(guest, mfns, [1, 2], in_domid=999, out_domid=999)
    with fails_with(hv, Errno.EPERM, match="xsm_memory_exchange"):
        exchange(guest, mfns, [1, 2], in_domid=other.domid, out_domid=other.domid)
    with fails_with(hv, Errno.EINVAL, done=0, match="steal_page"):
        exchange(guest, [other.mfn(40)], [1])
    mapped = guest.mfn(guest.next_pfn)
    held = hv.frame_info(mapped)
    with pytest.raises(XenError) as caught:
        exchange(guest, [mfns[0], mapped], [1, 2])  # the first chunk is done, the second changes nothing
    assert (caught.value.errno, caught.value.done) == (Errno.EINVAL, 1)
    assert hv.frames.owner[mfns[0]] == -1 and hv.frame_info(mapped) == held


def test_exchange_progress_cannot_be_forged(hv, guest):
    """XTF's XSA-212 test: a one-entry exchange that claims to be far into a huge one. Xen
    checks nr_exchanged against nr_extents and the lists against what is left to do."""
    (_, mfn), *_ = unmapped_pages(guest, 1)
    far = (0xFFFF830000000000) // 8
    with fails_with(hv, Errno.EINVAL, done=far + 2):
        exchange(guest, [mfn], [0], nr_exchanged=far + 2, nr_in=far + 1, nr_out=far + 1)
    with fails_with(hv, Errno.EFAULT, done=far):
        exchange(guest, [mfn], [0], nr_exchanged=far, nr_in=far + 1, nr_out=far + 1)
    assert exchange(guest, [mfn], [0], nr_exchanged=1) == {"result": 0, "nr_exchanged": 1, "extent_start": [0]}


def test_exchange_preempted_goes_on(hv):
    small = Hypervisor(nr_frames=1 << 14, preempt_work=16 * 32)
    g = Guest(small)
    pages = unmapped_pages(g, 64)
    first = g.call("memory_op", cmd="exchange", input={"extent_start": [m for _, m in pages], "nr_extents": 64}, output={"extent_start": [p for p, _ in pages], "nr_extents": 64}, nr_exchanged=0)
    assert isinstance(first, Continuation)
    answer, stops = g.go_on(first)
    assert answer["nr_exchanged"] == 64 and len(stops) >= 2
    assert small.m2p[answer["extent_start"]].tolist() == [p for p, _ in pages]
    assert audit(small) == []


def test_a_pinned_or_mapped_frame_given_back_lingers_until_its_last_reference(hv, guest):
    """Xen does not refuse: the allocation reference goes, the frame survives its pin."""
    pfn, mfn = guest.alloc()
    guest.make_readonly(pfn)
    guest.pin(1, mfn)
    assert give_back(guest, [mfn])["result"] == 1
    assert hv.frames.owner[mfn] == guest.domid and not hv.frames.flags[mfn] & 1
    assert give_back(guest, [mfn])["result"] == 1, "a second give-back finds the allocation gone: nothing to do"
    guest.unpin(mfn)
    guest.set_entry(*guest.direct_l1(pfn), 0)
    assert hv.frames.owner[mfn] == -1


@pytest.mark.parametrize("cmd", ["increase_reservation", "populate_physmap", "decrease_reservation"])
def test_reservation_ops_report_a_count_not_an_errno(hv, guest, cmd):
    try:
        answer = memop(guest, cmd, extent_start=[hv.nr_frames + 5], nr_extents=1, domid=999)
    except XenError as e:  # pragma: no cover - the assertion below names it
        pytest.fail(f"{cmd} raised {e}")
    assert answer["result"] == 0 and "no domain 999" in answer["stopped"]
    assert np.all(hv.frames.owner[hv.frames.owner == 999] == 999)


def test_balloon_round_trip_through_the_m2p(hv, guest):
    """What the guest kernel's balloon does: give pages back, take them again, fix its M2P."""
    pages = unmapped_pages(guest, 8)
    give_back(guest, [m for _, m in pages])
    got = memop(guest, "populate_physmap", extent_start=[p for p, _ in pages], nr_extents=8)["extent_start"]
    for (pfn, _), new in zip(pages, got, strict=True):
        assert guest.load(RO_MPT_VIRT_START + 8 * new) == pfn
        guest.set_entry(*guest.direct_l1(pfn), (new << PAGE_SHIFT) | 0x63)
        guest.store(guest.direct_va(pfn), pfn)
    guest.mmuext((MmuextCmd.TLB_FLUSH_LOCAL, 0))
    assert [guest.load(guest.direct_va(p)) for p, _ in pages] == [p for p, _ in pages]


def test_page_counts_audit_and_destroy_follow_frames_that_changed_owner(hv, guest):
    """The per-owner counts (docs/xen.md section 21) follow every frame memory_op gives or
    takes, and the domain's frames are found beyond its P2M: one given back but still pinned
    (no P2M entry, still the domain's) and an extent taken outside the P2M. audit_domain and
    destruction find both; destruction frees every frame, none quarantined."""
    pfn, pinned = guest.alloc()
    guest.make_readonly(pfn)
    guest.pin(1, pinned)
    assert give_back(guest, [pinned])["result"] == 1
    assert memop(guest, "increase_reservation", nr_extents=1, extent_order=2)["result"] == 1
    frames, d = hv.frames, guest.domid
    owned = np.flatnonzero(frames.owner == d)
    assert memop(guest, "current_reservation")["result"] == hv.tot_pages(d) == len(owned) - 1  # less shared info
    assert audit(hv) == [] and audit_domain(hv, d) == []
    free = frames.free_frames()
    result = hv.destroy_domain(d)
    assert result["freed_frames"] == len(owned) and result["quarantined_frames"] == [] and "bug" not in result
    assert frames.free_frames() == free + len(owned) and frames.tot_pages[d] == frames.xenheap_pages[d] == 0
    assert audit(hv) == []
