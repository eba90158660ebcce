"""update_va_mapping: a checked L1 update through the current pagetable (docs/xen.md section 6)."""

from hypervisor.core.abi import PAGE_SHIFT, UVMF_ALL, UVMF_INVLPG, UVMF_TLB_FLUSH, Errno
from hypervisor.core.tlb import TlbEntry

from .conftest import fails_with
from .guest import RW, US, A, D, P

VA = 0x400000


def user_space(guest):
    """A pinned pgd loaded on vCPU 0 mapping VA to a data page."""
    data = guest.alloc()[1]
    tree = guest.new_pgd({VA: data})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"])
    return tree, data


def test_remaps_through_current_pagetable(hv, guest):
    tree, data = user_space(guest)
    fresh = guest.alloc()[1]
    assert guest.call("update_va_mapping", va=VA, val=(fresh << PAGE_SHIFT) | P | RW | US | A | D) == 0
    assert int(hv.memory.entries(tree["l1"])[0]) >> PAGE_SHIFT & 0xFFFFFFFFFF == fresh
    assert hv.frame_info(fresh)["type_count"] == 2  # direct map + this mapping


def test_flags_select_flush_scope(hv, guest):
    user_space(guest)
    vcpus = guest.domain.vcpus
    for v in vcpus:
        v.tlb.fill(VA >> PAGE_SHIFT, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=True))
        v.tlb.fill(7, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=True, user=True))
    val = (guest.alloc()[1] << PAGE_SHIFT) | P | US
    guest.call("update_va_mapping", va=VA, val=val, flags=UVMF_INVLPG)
    assert [sorted(v.tlb.entries) for v in vcpus] == [[7], [7, VA >> PAGE_SHIFT]]
    guest.call("update_va_mapping", va=VA, val=val, flags=UVMF_TLB_FLUSH | UVMF_ALL)
    assert [len(v.tlb) for v in vcpus] == [0, 0]


def test_no_l1_for_va_einval(hv, guest):
    user_space(guest)
    with fails_with(hv, Errno.EINVAL, match="no L1"):
        guest.call("update_va_mapping", va=0x7F0000000000, val=0)


def test_l1_not_validated_einval(hv, guest):
    """Through an unpinned table loaded nowhere there is no live L1 to update."""
    with fails_with(hv, Errno.EINVAL):
        guest.call("update_va_mapping", va=VA, val=0)


def test_bad_entry_errno_and_no_flush(hv, guest, other):
    user_space(guest)
    vcpu = guest.domain.vcpus[0]
    vcpu.tlb.fill(3, TlbEntry(mfn=guest.mfn(0), flags=P, is_global=False, user=True))
    with fails_with(hv, Errno.EBUSY):
        guest.call("update_va_mapping", va=VA, val=(other.mfn(other.alloc()[0]) << PAGE_SHIFT) | P, flags=UVMF_TLB_FLUSH)


def test_bad_vcpumask_efault_after_update(hv, guest):
    tree, _ = user_space(guest)
    fresh = guest.alloc()[1]
    try:
        guest.call("update_va_mapping", va=VA, val=(fresh << PAGE_SHIFT) | P | US, flags=UVMF_TLB_FLUSH | 0x8)
        raise AssertionError("should fail")
    except Exception as e:
        assert e.errno == Errno.EFAULT
    assert int(hv.memory.entries(tree["l1"])[0]) >> PAGE_SHIFT & 0xFFFFFFFFFF == fresh  # as Xen: updated


def test_non_guest_address_einval(hv, guest):
    with fails_with(hv, Errno.EINVAL):
        guest.call("update_va_mapping", va=0xFFFF800000001000, val=0)
