"""The lazy-TLB unpin race at the hypervisor level (docs/xen.md section 11).

Unpin is never refused while another vCPU runs on the table; what the guest then sees is
that the tree stays a live pagetable, so making any of its frames writable fails with
-EBUSY, until the last vCPU switches away.
"""

import pytest

from hypervisor.core import XenError, audit
from hypervisor.core.abi import UVMF_INVLPG, Errno

from .conftest import fails_with
from .guest import RW, A, D, P


def test_unpin_while_other_vcpu_holds_cr3_then_rw_remap_fails_until_it_switches(hv, guest):
    data = guest.alloc()[1]
    tree = guest.new_pgd({0x400000: data})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)  # vCPU 1 runs on T (say, a lazy kernel thread)

    assert guest.unpin(tree["l4"], vcpu=0) == 1  # returns 0 in Xen terms: not refused
    l4 = hv.frame_info(tree["l4"])
    assert (l4["pinned"], l4["validated"], l4["type_count"]) == (False, True, 1)

    # exit_mmap goes on to make the table pages writable again: every one is refused.
    scratch = guest.alloc()[1]
    for pfn in tree["pfns"]:
        l1, index = guest.direct_l1(pfn)
        remap = ((l1 << 12) + 8 * index, (guest.mfn(pfn) << 12) | P | RW | A | D)
        with fails_with(hv, Errno.EBUSY, done=0, match="writable"):
            guest.mmu_update(remap)
        with pytest.raises(XenError) as caught:  # in a batch, mmu_update names the entry
            guest.mmu_update(((scratch << 12) + 8, 0x5A), remap)
        assert (caught.value.errno, caught.value.index, caught.value.done) == (Errno.EBUSY, 1, 1)
    with fails_with(hv, Errno.EBUSY):
        guest.call("update_va_mapping", va=guest.direct_va(tree["pfns"][0]), val=(tree["l4"] << 12) | P | RW | A | D, flags=UVMF_INVLPG)
    assert audit(hv) == []

    guest.new_baseptr(guest.l4, vcpu=1)  # vCPU 1 leaves: the last reference goes, T is demoted
    assert not hv.frame_info(tree["l4"])["validated"]
    for pfn in tree["pfns"]:
        guest.make_writable(pfn)
    assert hv.frame_info(tree["l4"])["type"] == "WRITABLE"
    assert audit(hv) == []


def test_repin_after_racy_unpin_is_o1(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    validated = hv.pagetables.entries_validated
    guest.pin(4, tree["l4"])
    assert hv.pagetables.entries_validated == validated


def test_down_vcpu_still_counts_as_a_user(hv, guest):
    tree = guest.new_pgd()
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.domain.vcpus[1].down = True
    guest.unpin(tree["l4"])
    assert hv.frame_info(tree["l4"])["validated"]
