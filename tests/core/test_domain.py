"""The domain builder and domain destruction (docs/xen.md sections 12.4, 17)."""

import numpy as np
import pytest

from hypervisor.core import Hypervisor, XenError, audit
from hypervisor.core.abi import DOMID_XEN, INVALID_M2P, PAGE_OFFSET, PAGE_SHIFT, START_INFO_FIELD_OFFSET, START_INFO_FIELDS, START_INFO_MAGIC, Errno, PageType

from .guest import Guest


def test_start_info_in_guest_memory_matches_record(hv, guest):
    info = guest.start_info
    raw = hv.memory.read(guest.mfn(0), 0, START_INFO_FIELD_OFFSET + 8 * len(START_INFO_FIELDS))
    assert raw.startswith(START_INFO_MAGIC)
    for i, name in enumerate(START_INFO_FIELDS):
        assert int.from_bytes(raw[START_INFO_FIELD_OFFSET + 8 * i :][:8], "little") == info[name]


def test_p2m_list_in_guest_memory(hv, guest):
    first = (guest.start_info["mfn_list"] - PAGE_OFFSET) >> PAGE_SHIFT
    words = hv.memory.entries(guest.mfn(first))
    assert [int(w) for w in words[:8]] == [guest.mfn(pfn) for pfn in range(8)]
    assert all(hv.frame_info(guest.mfn(pfn))["m2p"] == pfn for pfn in range(0, 2048, 97))


def test_initial_pagetable_pinned_loaded_and_readonly(hv):
    guest = Guest(hv, online=1)  # as the builder leaves it
    l4 = hv.frame_info(guest.l4)
    assert (l4["type"], l4["pinned"], l4["validated"], l4["type_count"]) == ("L4", True, True, 2)
    assert guest.domain.vcpus[0].guest_table == guest.l4
    assert [v.down for v in guest.domain.vcpus] == [False, True]
    first_pt = (guest.start_info["pt_base"] - PAGE_OFFSET) >> PAGE_SHIFT
    for pfn in range(first_pt, first_pt + guest.start_info["nr_pt_frames"]):
        assert hv.frame_info(guest.mfn(pfn))["type"] in ("L1", "L2", "L3", "L4")


def test_pfn_and_mfn_differ(hv, guest):
    assert any(guest.mfn(pfn) != pfn for pfn in range(16))


def test_destroy_frees_every_frame_and_m2p_entry():
    hv = Hypervisor(nr_frames=1 << 14)
    free = hv.frames.free_frames()
    guest = Guest(hv, nr_vcpus=2)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    result = hv.toolstack("destroy_domain", domid=guest.domid)
    assert result["freed_frames"] == 2048 + 1
    assert hv.frames.free_frames() == free
    assert hv.memory.stored_frames == 0
    assert audit(hv) == []


def test_destroy_breaks_linear_pagetable_cycles():
    """Two L4s that reference each other linearly would never be freed by refcounting alone."""
    hv = Hypervisor(nr_frames=1 << 14)
    guest = Guest(hv)
    a, b = guest.new_pgd(), guest.new_pgd()
    guest.pin(4, a["l4"])
    guest.pin(4, b["l4"])
    from .guest import A, P

    guest.set_entry(a["l4"], 300, (b["l4"] << PAGE_SHIFT) | P | A)  # linear, read-only
    guest.set_entry(a["l4"], 301, (a["l4"] << PAGE_SHIFT) | P | A)  # self-map: no reference
    assert hv.frame_info(b["l4"])["type_count"] == 2
    assert audit(hv) == []
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert audit(hv) == [] and hv.allocated_frames() == 16


def test_linear_entry_with_rw_is_refused(hv, guest):
    from hypervisor.core import XenError

    from .guest import RW, A, P

    a, b = guest.new_pgd(), guest.new_pgd()
    guest.pin(4, a["l4"])
    guest.pin(4, b["l4"])
    with pytest.raises(XenError) as caught:
        guest.set_entry(a["l4"], 300, (b["l4"] << PAGE_SHIFT) | P | RW | A)
    assert caught.value.errno == Errno.EINVAL


@pytest.mark.parametrize("pages,vcpus", [(4, 1), (2048, 0), (2048, 33)])
def test_create_rejects_bad_sizes(hv, pages, vcpus):
    with pytest.raises(Exception) as caught:
        hv.toolstack("create_domain", nr_pages=pages, nr_vcpus=vcpus)
    assert caught.value.errno == Errno.EINVAL


def test_create_without_memory_enomem():
    hv = Hypervisor(nr_frames=1024)
    with pytest.raises(Exception) as caught:
        hv.toolstack("create_domain", nr_pages=4096)
    assert caught.value.errno == Errno.ENOMEM and hv.frames.free_frames() == 1024 - 16


def test_highmem_pages_are_outside_the_direct_map(hv):
    guest = Guest(hv, nr_pages=4096, highmem_pages=1024)
    assert guest.start_info["nr_lowmem_pages"] == 3072
    assert int(np.count_nonzero(hv.frames.owner == guest.domid)) == 4097


# -- teardown of a domain whose counts are damaged ---------------------------------------------
# Nothing a guest can do should damage a count; these tests damage one directly, as a bug of
# the simulator would, and check that DestroyDomain still completes: the domain is gone, every
# frame it owned is scrubbed and freed or, where teardown could not account for a reference,
# quarantined (owned by Xen, never reallocated), and the call reports the bug instead of
# raising after the state changed.

SECRET = b"guest secret"


def _damaged_teardown(damage) -> tuple[Hypervisor, Guest, dict, int, list[int]]:
    """Build a guest with data in every frame it owns, `damage(hv, guest)` its counts (which
    returns the frames expected in quarantine), destroy it; returns what a test checks."""
    hv = Hypervisor(nr_frames=1 << 14)
    free = hv.frames.free_frames()
    guest = Guest(hv)
    for mfn in np.flatnonzero((hv.frames.owner == guest.domid) & (hv.frames.type < PageType.L1)).tolist():
        hv.memory.write(mfn, 4000, SECRET)  # every frame that is not a pagetable holds data
    expected = damage(hv, guest)
    result = hv.toolstack("destroy_domain", domid=guest.domid)
    return hv, guest, result, free, expected


def _assert_torn_down(hv: Hypervisor, guest: Guest, result: dict, free: int, quarantined: list[int]) -> None:
    assert guest.domid not in hv.domains
    assert result["freed_frames"] == 2048 + 1 - len(quarantined)
    assert sorted(result["quarantined_frames"]) == sorted(quarantined)
    assert all(f"{mfn:#x}" in result["bug"] for mfn in quarantined), result["bug"]
    assert hv.frames.free_frames() == free - len(quarantined)
    assert hv.memory.stored_frames == 0, "every frame the domain owned is scrubbed, quarantined ones too"
    assert not (hv.frames.owner == guest.domid).any(), "no frame keeps a dead owner"
    for mfn in quarantined:
        info = hv.frame_info(mfn)
        assert (info["owner"], info["quarantined"], info["count"], info["type_count"], info["m2p"]) == (DOMID_XEN, True, 0, 0, INVALID_M2P)
    findings = audit(hv)
    assert len(findings) == len(quarantined) and all("quarantined" in f for f in findings), findings
    assert all(any(f"{mfn:#x}" in f for f in findings) for mfn in quarantined)
    assert hv.stats[("destroy_domain", "bug")] == 1 and hv.stats[("destroy_domain", "ok")] == 0


def test_destroy_with_an_extra_general_reference_quarantines_that_frame_and_reports_the_bug():
    def damage(hv, guest):
        _, mfn = guest.alloc()
        assert hv.frames.get_page(mfn, guest.domid)  # a reference nobody holds
        return [mfn]

    _assert_torn_down(*_damaged_teardown(damage))


def test_destroy_with_an_extra_type_reference_on_an_l1_quarantines_only_that_l1():
    """The L1 stays validated, so its 512 entries would keep every frame they map alive; the
    forced devalidation drops them, and only the damaged L1 is lost."""

    def damage(hv, guest):
        l1, _ = guest.direct_l1(guest.next_pfn)
        hv.frames.type_count[l1] += 1
        return [l1]

    _assert_torn_down(*_damaged_teardown(damage))


def test_destroy_with_an_extra_type_reference_on_the_pinned_l4_quarantines_it():
    def damage(hv, guest):
        hv.frames.type_count[guest.l4] += 1
        return [guest.l4]

    _assert_torn_down(*_damaged_teardown(damage))


def test_destroy_completes_when_a_primitive_finds_a_count_below_zero():
    """A writable type count one short: devalidating the boot L1 that maps the frame breaks an
    invariant half-way; teardown goes on, and the frames that L1 still held are quarantined."""
    hv = Hypervisor(nr_frames=1 << 14)
    guest = Guest(hv)
    pfn, mfn = guest.alloc()
    hv.frames.type_count[mfn] -= 1
    result = hv.toolstack("destroy_domain", domid=guest.domid)
    assert guest.domid not in hv.domains and "below zero" in result["bug"]
    assert result["freed_frames"] + len(result["quarantined_frames"]) == 2048 + 1
    assert not (hv.frames.owner == guest.domid).any() and hv.memory.stored_frames == 0
    assert all("quarantined" in f for f in audit(hv))


def test_a_quarantined_frame_is_never_given_to_another_domain():
    hv = Hypervisor(nr_frames=16 + 2048 + 1)  # Xen's frames and one guest, shared info included
    guest = Guest(hv)
    _, mfn = guest.alloc()
    hv.frames.get_page(mfn, guest.domid)
    hv.toolstack("destroy_domain", domid=guest.domid)
    with pytest.raises(XenError) as caught:
        Guest(hv)  # needs every frame but the quarantined one
    assert caught.value.errno == Errno.ENOMEM
    other = Guest(hv, nr_pages=2048 - 1)
    assert mfn not in other.domain.p2m.tolist() and hv.frame_info(mfn)["quarantined"]


def test_domain_instances_are_never_reused_when_domids_are():
    """The domid counter wraps after 32,751 domains; a domid is then reused, an instance never."""
    hv = Hypervisor(nr_frames=1 << 14)
    old = Guest(hv)
    hv.toolstack("destroy_domain", domid=old.domid)
    hv._next_domid = old.domid  # the wrap, made cheap
    new = Guest(hv)
    assert new.domid == old.domid and new.domain.instance != old.domain.instance
