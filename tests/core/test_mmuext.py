"""mmuext_op: pins, base pointers, flushes, page ops (docs/xen.md sections 5, 8, 10, 19)."""

import pytest

from hypervisor.core.abi import PAGE_SHIFT, Errno, MmuextCmd
from hypervisor.core.tlb import TlbEntry

from .conftest import fails_with
from .guest import RW, TABLE, US, A, D, P


def test_pin_validates_tree_and_holds_refs(hv, guest):
    _, data = guest.alloc()
    tree = guest.new_pgd({0x400000: data})
    assert guest.pin(4, tree["l4"]) == 1
    for level in ("l4", "l3", "l2", "l1"):
        info = hv.frame_info(tree[level])
        assert info["validated"] and info["type"] == level.upper()
    l4 = hv.frame_info(tree["l4"])
    assert (l4["pinned"], l4["type_count"]) == (True, 1)
    assert hv.frame_info(data)["type"] == "WRITABLE"


def test_double_pin_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    with fails_with(hv, Errno.EINVAL, done=0, match="already pinned"):
        guest.pin(4, tree["l4"])


def test_pin_wrong_level_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    with fails_with(hv, Errno.EINVAL, match="has type L4"):
        guest.pin(1, tree["l4"])


def test_pin_frame_mapped_writable_einval(hv, guest):
    _, page = guest.new_table()
    guest.make_writable(guest.next_pfn - 1)
    with fails_with(hv, Errno.EINVAL, match="WRITABLE"):
        guest.pin(1, page)


def test_pin_tree_with_rw_mapping_of_pagetable_ebusy(hv, guest):
    """Validation fails deep in the tree: the errno of the L1 entry surfaces, nothing stays."""
    tree = guest.new_pgd()
    guest.set_entry(tree["l1"], 7, (tree["l2"] << PAGE_SHIFT) | P | RW | A | D)  # RW map of the L2
    with fails_with(hv, Errno.EBUSY, match="L1 entry 7"):
        guest.pin(4, tree["l4"])
    for level in ("l4", "l3", "l2", "l1"):
        info = hv.frame_info(tree[level])
        assert (info["type_count"], info["validated"], info["pinned"]) == (0, False, False), level
    for level in ("l4", "l3", "l1"):  # failed at their first slot, or an L1: validate_page's type_info = 0
        assert hv.frame_info(tree[level])["type"] == "NONE", level


def test_failed_pin_leaves_the_frame_without_a_type(hv, guest):
    """Xen's validate_page sets type_info = 0 when validation fails: the frame that was
    WRITABLE (and validated) until it was made read-only now has no type at all."""
    _, data = guest.alloc()
    pfn, l1 = guest.new_table({3: (data << PAGE_SHIFT) | P | A | 0x80})  # PSE: not allowed in an L1
    guest.make_readonly(pfn)
    assert hv.frame_info(l1)["type"] == "WRITABLE"
    with fails_with(hv, Errno.EINVAL, done=0, match="L1 entry 3"):
        guest.pin(1, l1)
    info = hv.frame_info(l1)
    assert (info["type"], info["type_count"], info["count"], info["validated"], info["pinned"]) == ("NONE", 0, 2, False, False)


def test_failed_l1_validation_leaves_the_writable_type_on_frames_mapped_before_the_bad_entry(hv, guest):
    """promote_l1_table takes the references of the entries before the failing one and drops
    them again: a frame one of them maps writable keeps its new type (type count 0)."""
    old_pfn, old_l1 = guest.new_table()
    guest.make_readonly(old_pfn)
    guest.pin(1, old_l1)
    guest.unpin(old_l1)  # an L1 no more: type L1, count 0, not validated
    pfn, l1 = guest.new_table({0: (old_l1 << PAGE_SHIFT) | P | RW | A | D, 1: (old_l1 << PAGE_SHIFT) | P | A | 0x80})
    guest.make_readonly(pfn)
    with fails_with(hv, Errno.EINVAL, match="L1 entry 1"):
        guest.pin(1, l1)
    info = hv.frame_info(old_l1)
    assert (info["type"], info["type_count"], info["validated"]) == ("WRITABLE", 0, True)


def test_failed_upper_validation_leaves_the_tables_validated_before_it_typed_but_unreferenced(hv, guest):
    """An L2 whose entry 1 fails drops what entry 0 took: the L1 entry 0 validated keeps its
    L1 type with no type reference and is not validated any more, as Xen's unwinding leaves it."""
    l1_pfn, l1 = guest.new_table()
    _, mapped_rw = guest.alloc()  # WRITABLE through the direct map: it cannot become an L1
    l2_pfn, l2 = guest.new_table({0: (l1 << PAGE_SHIFT) | TABLE, 1: (mapped_rw << PAGE_SHIFT) | TABLE})
    guest.make_readonly(l1_pfn)
    guest.make_readonly(l2_pfn)
    with fails_with(hv, Errno.EINVAL, match="L2 entry 1"):
        guest.pin(2, l2)
    info = hv.frame_info(l1)
    assert (info["type"], info["type_count"], info["validated"], info["count"]) == ("L1", 0, False, 2)


def test_pin_not_owned_einval(hv, guest, other):
    tree = other.new_pgd()
    with fails_with(hv, Errno.EINVAL, match=f"not owned by dom{guest.domid}"):
        guest.pin(4, tree["l4"])


def test_unpin_unpinned_einval(hv, guest):
    tree = guest.new_pgd()
    with fails_with(hv, Errno.EINVAL, match="not pinned"):
        guest.unpin(tree["l4"])


def test_unpin_not_owned_einval(hv, guest, other):
    with fails_with(hv, Errno.EINVAL):
        guest.unpin(other.l4)


def test_unpin_devalidates_whole_tree(hv, guest):
    _, data = guest.alloc()
    tree = guest.new_pgd({0x400000: data})
    direct_map_only = hv.frame_info(data)["type_count"]
    guest.pin(4, tree["l4"])
    assert hv.frame_info(data)["type_count"] == direct_map_only + 1
    guest.unpin(tree["l4"])
    for level in ("l4", "l3", "l2", "l1"):
        info = hv.frame_info(tree[level])
        assert (info["validated"], info["type_count"], info["type"]) == (False, 0, level.upper())
    assert hv.frame_info(data)["type_count"] == direct_map_only


def test_repin_after_unpin_revalidates(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    guest.unpin(tree["l4"])
    validated = hv.pagetables.entries_validated
    guest.pin(4, tree["l4"])
    assert hv.pagetables.entries_validated == validated + 4 * 512


def test_new_baseptr_of_pinned_table_is_o1(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    validated = hv.pagetables.entries_validated
    guest.new_baseptr(tree["l4"])
    assert hv.pagetables.entries_validated == validated
    assert guest.domain.vcpus[0].guest_table == tree["l4"]
    assert hv.frame_info(tree["l4"])["type_count"] == 2


def test_new_baseptr_unpinned_validates_then_switch_away_devalidates(hv, guest):
    tree = guest.new_pgd()
    boot = guest.l4
    guest.new_baseptr(tree["l4"])
    assert hv.frame_info(tree["l1"])["validated"]
    guest.new_baseptr(boot)
    assert not hv.frame_info(tree["l1"])["validated"]
    assert hv.frame_info(tree["l4"])["type_count"] == 0


def test_new_baseptr_flushes_including_global(hv, guest):
    vcpu = guest.domain.vcpus[0]
    vcpu.tlb.fill(1, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=True))
    guest.new_baseptr(guest.l4)  # same base: reload only
    assert len(vcpu.tlb) == 0


def test_new_baseptr_of_l3_einval(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    with fails_with(hv, Errno.EINVAL, match="has type L3"):
        guest.new_baseptr(tree["l3"])


def test_new_baseptr_not_owned_einval(hv, guest, other):
    with fails_with(hv, Errno.EINVAL):
        guest.new_baseptr(other.l4)


def test_new_user_baseptr_takes_and_drops_refs(hv, guest):
    tree = guest.new_pgd(kernel=False)
    guest.pin(4, tree["l4"])
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, tree["l4"]))
    assert hv.frame_info(tree["l4"])["type_count"] == 2
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, 0))
    assert hv.frame_info(tree["l4"])["type_count"] == 1
    assert guest.domain.vcpus[0].guest_table_user == 0


def test_foreign_mmuext_eperm(hv, guest, other):
    with fails_with(hv, Errno.EPERM, done=0):
        guest.mmuext((MmuextCmd.TLB_FLUSH_LOCAL, 0), foreigndom=other.domid)


def test_mark_super_eopnotsupp(hv, guest):
    for cmd in (MmuextCmd.MARK_SUPER, MmuextCmd.UNMARK_SUPER):
        with fails_with(hv, Errno.EOPNOTSUPP):
            guest.mmuext((cmd, guest.l4))


@pytest.mark.parametrize("cmd", [14, 21, 99])
def test_unknown_mmuext_enosys(hv, guest, cmd):
    with fails_with(hv, Errno.ENOSYS):
        guest.mmuext((cmd, 0))


def test_flush_cache_eacces(hv, guest):
    with fails_with(hv, Errno.EACCES):
        guest.mmuext((MmuextCmd.FLUSH_CACHE, 0))


def test_set_ldt_bad_base_einval(hv, guest):
    with fails_with(hv, Errno.EINVAL):
        guest.mmuext((MmuextCmd.SET_LDT, 0x1001, 4))
    assert guest.mmuext((MmuextCmd.SET_LDT, 0, 0)) == 1


def test_batch_done_count(hv, guest):
    tree = guest.new_pgd()
    with pytest.raises(Exception) as caught:
        guest.mmuext((MmuextCmd.PIN_L4_TABLE, tree["l4"]), (MmuextCmd.TLB_FLUSH_LOCAL,), (MmuextCmd.UNPIN_TABLE, guest.alloc()[1]))
    assert (caught.value.errno, caught.value.done, caught.value.index) == (Errno.EINVAL, 2, 2)
    assert hv.frame_info(tree["l4"])["pinned"]


def test_clear_page(hv, guest):
    _, page = guest.alloc()
    hv.memory.write(page, 0, b"dirty")
    guest.mmuext((MmuextCmd.CLEAR_PAGE, page))
    assert hv.memory.read(page, 0, 5) == bytes(5)


def test_clear_pagetable_einval(hv, guest):
    with fails_with(hv, Errno.EINVAL, match="clear"):
        guest.mmuext((MmuextCmd.CLEAR_PAGE, guest.l4))


def test_copy_page_from_pagetable_allowed(hv, guest):
    _, page = guest.alloc()
    guest.mmuext((MmuextCmd.COPY_PAGE, page, guest.l4))
    assert hv.memory.read(page, 0, 4096) == hv.memory.read(guest.l4, 0, 4096)


def test_copy_page_to_pagetable_or_foreign_einval(hv, guest, other):
    _, page = guest.alloc()
    with fails_with(hv, Errno.EINVAL):
        guest.mmuext((MmuextCmd.COPY_PAGE, guest.l4, page))
    with fails_with(hv, Errno.EINVAL):
        guest.mmuext((MmuextCmd.COPY_PAGE, page, other.alloc()[1]))


def cpumask_va(guest, mask: int) -> int:
    """Keep a cpumask in guest memory, as Linux does, and return its virtual address."""
    pfn, mfn = guest.alloc()
    guest.hv.memory.write(mfn, 8, mask.to_bytes(8, "little"))
    return guest.direct_va(pfn) + 8


def test_tlb_flush_multi_flushes_named_vcpus_only(hv):
    from .guest import Guest

    guest = Guest(hv, nr_vcpus=3)
    for vcpu in guest.domain.vcpus:
        vcpu.tlb.fill(7, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=False, user=False))
    guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, cpumask_va(guest, 0b110 | 1 << 40)))
    assert [len(v.tlb) for v in guest.domain.vcpus] == [1, 0, 0]


def test_invlpg_multi_drops_one_page(hv, guest):
    vcpu = guest.domain.vcpus[1]
    vcpu.tlb.fill(7, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=False))
    vcpu.tlb.fill(8, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=False))
    guest.mmuext((MmuextCmd.INVLPG_MULTI, 7 << PAGE_SHIFT, cpumask_va(guest, 0b10)))
    assert list(vcpu.tlb.entries) == [8]


def test_tlb_flush_multi_bad_mask_pointer_einval(hv, guest):
    with fails_with(hv, Errno.EINVAL, match="bitmap"):
        guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, 0x10))


def test_tlb_flush_all_and_local(hv, guest):
    for vcpu in guest.domain.vcpus:
        vcpu.tlb.fill(7, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=False))
    guest.mmuext((MmuextCmd.TLB_FLUSH_LOCAL,), vcpu=1)
    assert [len(v.tlb) for v in guest.domain.vcpus] == [1, 0]
    guest.mmuext((MmuextCmd.TLB_FLUSH_ALL,))
    assert [len(v.tlb) for v in guest.domain.vcpus] == [0, 0]


def test_invlpg_non_canonical_is_silent(hv, guest):
    assert guest.mmuext((MmuextCmd.INVLPG_LOCAL, 0x0000_8000_0000_0000)) == 1


def test_type_change_drops_stale_translations(hv, guest):
    """Xen's safety flush: a frame that becomes a pagetable is in no TLB any more."""
    pfn, page = guest.alloc()
    vcpu = guest.domain.vcpus[1]
    vcpu.tlb.fill(3, TlbEntry(mfn=page, flags=P | RW, is_global=False, user=False))
    guest.make_readonly(pfn)
    guest.pin(1, page)
    assert len(vcpu.tlb) == 0


def test_user_table_mapped_by_user_pgd(hv, guest):
    tree = guest.new_pgd({0x400000: guest.alloc()[1]}, user_rw=False, kernel=False)
    guest.pin(4, tree["l4"])
    assert hv.frame_info(tree["l1"])["type_count"] == 1
    assert int(hv.memory.entries(tree["l4"])[0]) & US
