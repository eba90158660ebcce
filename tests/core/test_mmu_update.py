"""mmu_update: entry checks, per-level rules, done-counts (docs/xen.md sections 2-4, 19)."""

from hypervisor.core import XenError
from hypervisor.core.abi import DOMID_IO, DOMID_SELF, PAGE_SHIFT, Errno, MmuCmd, Pte

from .conftest import fails_with
from .guest import RW, TABLE, US, A, D, P

PSE, PCD, GLOBAL = int(Pte.PSE), int(Pte.PCD), int(Pte.GLOBAL)


def pte(mfn, flags=P | RW | US | A | D):
    return (mfn << PAGE_SHIFT) | flags


def ptr(table, index, cmd=MmuCmd.NORMAL_PT_UPDATE):
    return (table << PAGE_SHIFT) + 8 * index + cmd


def pinned_l1(guest, entries=None):
    pfn, l1 = guest.new_table(entries)
    guest.make_readonly(pfn)
    guest.pin(1, l1)
    return l1


def test_pinned_l1_update_takes_references_and_returns_count(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    before = hv.frame_info(data)
    assert guest.mmu_update((ptr(l1, 3), pte(data))) == 1
    after = hv.frame_info(data)
    assert (after["count"], after["type"], after["type_count"]) == (before["count"] + 1, "WRITABLE", before["type_count"] + 1)
    stored = int(hv.memory.entries(l1)[3])
    assert stored & Pte.GLOBAL and stored & Pte.USER  # Xen's adjust_guest_l1e for a user page


def test_kernel_page_gets_guest_kernel_bit(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    guest.mmu_update((ptr(l1, 0), pte(data, P | RW | A | D)))
    stored = int(hv.memory.entries(l1)[0])
    assert stored & Pte.GUEST_KERNEL and stored & Pte.USER and not stored & Pte.GLOBAL


def test_failing_batch_ends_in_the_state_of_its_prefix():
    """Entries before the failing one stay committed, the failing one and those after it
    leave no trace: the batch ends exactly where its committed prefix alone would."""
    from hypervisor.core import Hypervisor
    from hypervisor.core.trace import state_digest

    from .guest import Guest

    def world():
        hv = Hypervisor(nr_frames=1 << 14)
        guest, other = Guest(hv), Guest(hv)
        l1 = pinned_l1(guest)
        a, b = guest.alloc()[1], guest.alloc()[1]
        foreign = other.mfn(other.alloc()[0])
        return hv, guest, [(ptr(l1, 0), pte(a)), (ptr(l1, 1), pte(b)), (ptr(l1, 2), pte(foreign)), (ptr(l1, 5), pte(a))]

    hv, guest, batch = world()
    try:
        guest.mmu_update(*batch)
        raise AssertionError("the batch should fail")
    except XenError as e:
        assert (e.errno, e.index, e.done) == (Errno.EBUSY, 2, 2)
        assert "L1 entry 2" in e.message and "owned by dom2" in e.message
    twin, twin_guest, twin_batch = world()
    assert twin_guest.mmu_update(*twin_batch[:2]) == 2
    assert state_digest(hv) == state_digest(twin)


def test_entries_before_failure_stay_committed(hv, guest, other):
    l1 = pinned_l1(guest)
    _, a = guest.alloc()
    foreign = other.mfn(other.alloc()[0])
    try:
        guest.mmu_update((ptr(l1, 0), pte(a)), (ptr(l1, 1), pte(foreign)), (ptr(l1, 2), pte(a)))
    except Exception as e:
        assert e.done == 1
    assert int(hv.memory.entries(l1)[0]) >> PAGE_SHIFT & 0xFFFFFFFFFF == a
    assert int(hv.memory.entries(l1)[2]) == 0


def test_l1_maps_foreign_frame_ebusy(hv, guest, other):
    l1 = pinned_l1(guest)
    foreign = other.mfn(other.alloc()[0])
    with fails_with(hv, Errno.EBUSY, done=0, match=f"owned by dom{other.domid}"):
        guest.mmu_update((ptr(l1, 0), pte(foreign, P | A)))


def test_l1_maps_free_frame_ebusy(hv, guest):
    l1 = pinned_l1(guest)
    free = hv.nr_frames - 1
    assert hv.frame_info(free)["owner"] is None
    with fails_with(hv, Errno.EBUSY, match="free"):
        guest.mmu_update((ptr(l1, 0), pte(free)))


def test_l1_rw_onto_pagetable_ebusy(hv, guest):
    l1 = pinned_l1(guest)
    with fails_with(hv, Errno.EBUSY, match="writable"):
        guest.mmu_update((ptr(l1, 0), pte(l1)))


def test_l1_readonly_onto_pagetable_allowed(hv, guest):
    l1 = pinned_l1(guest)
    count = hv.frame_info(l1)["count"]
    guest.mmu_update((ptr(l1, 0), pte(l1, P | A)))
    assert hv.frame_info(l1)["count"] == count + 1


def test_l1_maps_mmio_eperm(hv, guest):
    l1 = pinned_l1(guest)
    with fails_with(hv, Errno.EPERM, match="MMIO"):
        guest.mmu_update((ptr(l1, 0), pte(hv.nr_frames + 5)))


def test_l1_cache_bits_einval(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    with fails_with(hv, Errno.EINVAL, match="PCD"):
        guest.mmu_update((ptr(l1, 0), pte(data, P | RW | PCD)))


def test_l1_global_bit_allowed(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    assert guest.mmu_update((ptr(l1, 0), pte(data, P | RW | GLOBAL))) == 1


def test_pse_at_l2_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    _, data = guest.alloc()
    with fails_with(hv, Errno.EINVAL, match="PSE"):
        guest.mmu_update((ptr(tree["l2"], 7), pte(data, P | RW | PSE)))


def test_l4_update_in_xen_slot_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    with fails_with(hv, Errno.EINVAL, match="Xen's private area"):
        guest.mmu_update((ptr(tree["l4"], 260), pte(tree["l3"], TABLE)))


def test_l2_entry_to_frame_mapped_writable_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    pfn, l1 = guest.new_table()  # still mapped writable in the direct map
    with fails_with(hv, Errno.EINVAL, match="WRITABLE"):
        guest.mmu_update((ptr(tree["l2"], 9), pte(l1, TABLE)))
    guest.make_readonly(pfn)
    assert guest.mmu_update((ptr(tree["l2"], 9), pte(l1, TABLE))) == 1
    assert hv.frame_info(l1)["type"] == "L1" and hv.frame_info(l1)["validated"]


def test_l2_update_flushes_owner_tlbs(hv, guest):
    from hypervisor.core.tlb import TlbEntry

    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    vcpu = guest.domain.vcpus[1]
    vcpu.tlb.fill(5, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=False))
    pfn, l1 = guest.new_table()
    guest.make_readonly(pfn)
    guest.mmu_update((ptr(tree["l2"], 9), pte(l1, TABLE)))
    assert len(vcpu.tlb) == 0


def test_l1_update_does_not_flush(hv, guest):
    from hypervisor.core.tlb import TlbEntry

    l1 = pinned_l1(guest)
    vcpu = guest.domain.vcpus[1]
    vcpu.tlb.fill(5, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=False, user=False))
    guest.mmu_update((ptr(l1, 0), pte(guest.alloc()[1])))
    assert len(vcpu.tlb) == 1


def test_fast_path_keeps_references(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    guest.mmu_update((ptr(l1, 0), pte(data)))
    before = hv.frame_info(data)
    guest.mmu_update((ptr(l1, 0), pte(data) | int(Pte.NX)))  # whitelisted flag only
    assert hv.frame_info(data) == before
    guest.mmu_update((ptr(l1, 0), pte(data, P | US | A)))  # RW dropped: slow path
    after = hv.frame_info(data)
    assert (after["count"], after["type_count"]) == (before["count"], before["type_count"] - 1)


def test_preserve_ad_keeps_accessed_dirty(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    guest.mmu_update((ptr(l1, 0), pte(data, P | RW | US | A | D)))
    guest.mmu_update((ptr(l1, 0, MmuCmd.PT_UPDATE_PRESERVE_AD), pte(data, P | RW | US)))
    assert int(hv.memory.entries(l1)[0]) & (A | D) == A | D


def test_unvalidated_frame_is_plain_memory(hv, guest):
    _, page = guest.alloc()
    foreign_looking = pte(hv.nr_frames - 1)  # would be refused in a live L1
    assert guest.mmu_update((ptr(page, 4), foreign_looking)) == 1
    assert int(hv.memory.entries(page)[4]) == foreign_looking
    assert hv.frame_info(page)["type"] == "WRITABLE" and hv.frame_info(page)["type_count"] == 1


def test_target_not_owned_einval(hv, guest, other):
    _, page = other.alloc()
    with fails_with(hv, Errno.EINVAL, match="not dom"):
        guest.mmu_update((ptr(page, 0), 0))


def test_unknown_command_enosys(hv, guest):
    _, page = guest.alloc()
    for cmd in (4, 5, 6, 7):
        with fails_with(hv, Errno.ENOSYS, done=0):
            guest.mmu_update((ptr(page, 0, cmd), 0))


def test_foreigndom_own_numeric_id_esrch(hv, guest):
    _, page = guest.alloc()
    with fails_with(hv, Errno.ESRCH, done=0, match="DOMID_SELF"):
        guest.mmu_update((ptr(page, 0), 0), foreigndom=guest.domid)


def test_foreigndom_unknown_esrch(hv, guest):
    with fails_with(hv, Errno.ESRCH, done=0):
        guest.mmu_update((ptr(guest.alloc()[1], 0), 0), foreigndom=0x1234)


def test_foreign_data_owner_eperm(hv, guest, other):
    l1 = pinned_l1(guest)
    with fails_with(hv, Errno.EPERM, done=0):
        guest.mmu_update((ptr(l1, 0), pte(other.mfn(other.alloc()[0]))), foreigndom=other.domid)


def test_foreign_pagetable_owner_eperm(hv, guest, other):
    _, page = other.alloc()
    with fails_with(hv, Errno.EPERM, done=0):
        guest.mmu_update((ptr(page, 0), 0), foreigndom=(other.domid + 1) << 16 | DOMID_SELF)


def test_domid_io_for_ram_ebusy(hv, guest):
    l1 = pinned_l1(guest)
    _, data = guest.alloc()
    with fails_with(hv, Errno.EBUSY):
        guest.mmu_update((ptr(l1, 0), pte(data, P | A)), foreigndom=DOMID_IO)


def test_machphys_update_sets_m2p(hv, guest):
    pfn, mfn = guest.alloc()
    assert guest.machphys(mfn, 0x1234) == 1
    assert hv.frame_info(mfn)["m2p"] == 0x1234


def test_machphys_not_owned_einval(hv, guest, other):
    _, mfn = other.alloc()
    with fails_with(hv, Errno.EINVAL):
        guest.machphys(mfn, 1)


def test_machphys_foreign_pagetable_owner_eperm(hv, guest, other):
    _, mfn = guest.alloc()
    with fails_with(hv, Errno.EPERM):
        guest.mmu_update(((mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, 1), foreigndom=(other.domid + 1) << 16 | DOMID_SELF)
