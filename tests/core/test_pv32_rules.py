"""Every PAE rule of a 32-bit PV guest (docs/pv32.md section 3) with Xen's errno, the done
count of the batch, and the model unchanged by the failed entry; and the 64-bit answer beside
it where the rule is the 32-bit domain's alone."""

import pytest

from hypervisor.core import Hypervisor, audit
from hypervisor.core.abi import L2_SLOT_COMPAT_XEN_FIRST, PAE_L3_MAX_MFN, PAGE_SHIFT, Errno, MmuextCmd, Pte, VMASST_CMD_disable, VMASST_CMD_enable, VMASST_TYPE_pae_extended_cr3
from hypervisor.core.frames import PAE_XEN_L2

from .conftest import fails_with
from .guest import RW, US, A, D, Guest, P
from .test_pv32 import pae_pgd

G, PSE, NX, AVAIL = int(Pte.GLOBAL), int(Pte.PSE), int(Pte.NX), int(Pte.AVAIL)


@pytest.fixture
def pae(hv):
    return Guest(hv, address_size=32)


def entry(mfn: int, flags: int = P) -> int:
    return (mfn << PAGE_SHIFT) | flags


def l3_with(guest: Guest, entries: dict[int, int]) -> int:
    """A fresh page made read-only, holding `entries`, to be pinned or loaded as a PAE L3."""
    pfn, mfn = guest.new_table(entries)
    guest.make_readonly(pfn)
    return mfn


def fresh_l2(guest: Guest, entries: dict[int, int] | None = None) -> int:
    return l3_with(guest, entries or {})


def test_entries_4_to_511_are_zeroed_and_entries_adjusted_with_us_rw_then_undone(hv, pae):
    """promote_l3_table zeroes entries 4..511; adjust_guest_l3e adds US|RW; demote_l3_table's
    unadjust_guest_l3e strips US|RW|A, so a devalidated L3 reads as the guest wrote it (Linux
    writes a PAE pgd entry PRESENT alone)."""
    l2, xen_l2 = fresh_l2(pae), fresh_l2(pae)
    l3 = l3_with(pae, {0: entry(l2), 3: entry(xen_l2), 4: entry(l2), 300: 0xDEAD000 | P})
    assert pae.pin(3, l3) == 1
    words = hv.memory.entries(l3)
    assert not words[4:].any()
    assert [int(words[i]) for i in (0, 3)] == [entry(l2, P | US | RW), entry(xen_l2, P | US | RW)]
    assert pae.unpin(l3) == 1
    assert [int(words[i]) for i in (0, 3)] == [entry(l2), entry(xen_l2)]
    assert not hv.frames.flags[xen_l2] & PAE_XEN_L2  # demote_l2_table clears it


def test_a_failed_pin_leaves_even_the_entries_above_4_as_they_were(hv, pae):
    l3 = l3_with(pae, {10: entry(fresh_l2(pae))})
    with fails_with(hv, Errno.EINVAL, done=0, match="entry 3"):  # slot 3 is not present
        pae.pin(3, l3)
    assert hv.memory.entries(l3).item(10)


@pytest.mark.parametrize("flags", [PSE, G, int(Pte.PWT), NX, 1 << 52])
def test_l3_flags_outside_0xfffff198_are_einval_at_pin_and_update(hv, pae, guest, flags):
    l2, xen_l2 = fresh_l2(pae), fresh_l2(pae)
    bad = l3_with(pae, {0: entry(l2, P | flags), 3: entry(xen_l2)})
    with fails_with(hv, Errno.EINVAL, done=1, match="bad L3 flags"):
        pae.mmuext((MmuextCmd.TLB_FLUSH_LOCAL, 0), (MmuextCmd.PIN_L3_TABLE, bad))
    good = l3_with(pae, {3: entry(fresh_l2(pae))})
    assert pae.pin(3, good) == 1
    with fails_with(hv, Errno.EINVAL, done=0, match="bad L3 flags"):
        pae.set_entry(good, 0, entry(l2, P | flags))
    if flags == NX:  # a 64-bit L3 takes NX
        l2_64 = fresh_l2(guest)
        assert guest.pin(3, l3_with(guest, {0: entry(l2_64, P | NX)})) == 1


def test_l3_entries_take_rw_us_accessed_dirty_and_avail(hv, pae):
    l3 = l3_with(pae, {0: entry(fresh_l2(pae), P | RW | US | A | D | AVAIL), 3: entry(fresh_l2(pae))})
    assert pae.pin(3, l3) == 1


def test_slot_3_must_take_pae_xen_l2_alone(hv, pae):
    """pae_xen_mappings_check: the slot-3 L2 is this L3's only (type count 1); an L2 typed
    PAE_XEN_L2 is no ordinary L2 (and back): the bit is part of the type."""
    shared = fresh_l2(pae)
    first = l3_with(pae, {3: entry(shared)})
    assert pae.pin(3, first) == 1
    second = l3_with(pae, {3: entry(shared)})
    with fails_with(hv, Errno.EINVAL, done=0, match="pae_xen_mappings_check"):
        pae.pin(3, second)
    with fails_with(hv, Errno.EINVAL, done=0, match="cannot take type L2"):  # as an ordinary L2 of slot 0
        pae.set_entry(first, 0, entry(shared))
    plain = fresh_l2(pae)
    assert pae.set_entry(first, 0, entry(plain)) == 1
    third = l3_with(pae, {3: entry(plain)})
    with fails_with(hv, Errno.EINVAL, done=0, match="cannot take type L2|PAE_XEN_L2"):
        pae.pin(3, third)


def test_pae_xen_mappings_check_refuses_an_l2_whose_count_is_not_1(hv, pae):
    """The slot-3 L2 of a loaded, unpinned L3 that a second L3 names: get_page_type succeeds
    (same type, validated), then the count is 2: EINVAL, and the reference is dropped."""
    tree = pae_pgd(pae)
    assert pae.pin(3, tree["l3"]) == 1
    twin = l3_with(pae, {3: entry(tree["kernel_l2"])})
    with fails_with(hv, Errno.EINVAL, done=0, match="pae_xen_mappings_check"):
        pae.pin(3, twin)


@pytest.mark.parametrize("slot", [3, 4, 511])
def test_mod_l3_entry_at_slot_3_or_above_is_einval(hv, pae, slot):
    l3 = pae.l4  # the boot L3, pinned
    ok = (l3 << PAGE_SHIFT) + 8 * 1, 0  # a done entry that changes nothing
    with fails_with(hv, Errno.EINVAL, done=1, match=f"entry {slot} of mfn"):
        pae.mmu_update(ok, ((l3 << PAGE_SHIFT) + 8 * slot, 0))


def test_xens_slots_of_the_pae_xen_l2_are_eperm(hv, pae):
    l2 = hv.memory.entries(pae.l4).item(3) >> PAGE_SHIFT & ((1 << 40) - 1)
    last_guest = (l2 << PAGE_SHIFT) + 8 * (L2_SLOT_COMPAT_XEN_FIRST - 1), entry(fresh_l2(pae), P | RW | A | D)
    for slot in (L2_SLOT_COMPAT_XEN_FIRST, 511):
        with fails_with(hv, Errno.EPERM, done=0, match=f"L2 entry {slot}"):
            pae.set_entry(l2, slot, 0)
    assert pae.mmu_update(last_guest) == 1


def test_an_l3_above_4gib_is_erange_until_the_guest_enables_pae_extended_cr3():
    """promote_l3_table: a PAE L3 at or above mfn 0x100000 once vCPU 0 is initialised; the
    toolstack's boot L3 there was let through (before vCPU 0 ran). HYPERVISOR_vm_assist
    enabling pae_extended_cr3 lets the pin through; disabling it again refuses the next one,
    and the L3 already pinned stays (docs/xen.md section 25)."""
    hv = Hypervisor(nr_frames=PAE_L3_MAX_MFN + 4096)
    filler = hv.toolstack("create_domain", nr_pages=PAE_L3_MAX_MFN - 64, highmem_pages=PAE_L3_MAX_MFN - 64 - 4096)
    pae = Guest(hv, nr_pages=256, address_size=32)
    assert pae.l4 >= PAE_L3_MAX_MFN  # the boot L3, pinned by the toolstack
    l3, second = (l3_with(pae, {3: entry(fresh_l2(pae))}) for _ in range(2))
    assert min(l3, second) >= PAE_L3_MAX_MFN
    with fails_with(hv, Errno.ERANGE, done=0, match="4 GiB"):
        pae.pin(3, l3)
    assert pae.call("vm_assist", cmd=VMASST_CMD_enable, type=VMASST_TYPE_pae_extended_cr3) == 0
    assert pae.pin(3, l3) == 1
    assert pae.call("vm_assist", cmd=VMASST_CMD_disable, type=VMASST_TYPE_pae_extended_cr3) == 0
    with fails_with(hv, Errno.ERANGE, done=0, match="4 GiB"):
        pae.pin(3, second)
    assert hv.frames.is_pinned(l3)
    hv.toolstack("destroy_domain", domid=filler["domid"])
    assert audit(hv) == []


def test_pin_l4_of_a_32bit_pg_owner_is_ignored_also_when_foreign(hv, pae, guest):
    """do_mmuext_op: `if ( is_pv_32bit_domain(pg_owner) ) break;`, before any check: rc 0 for
    any frame, the caller's own or a privileged caller's foreigndom."""
    assert pae.pin(4, pae.l4) == 1 and pae.pin(4, 0xFFFFFF) == 1
    guest.domain.privileged = True
    assert guest.mmuext((MmuextCmd.PIN_L4_TABLE, pae.l4), foreigndom=pae.domid) == 1
    with fails_with(hv, Errno.EINVAL, done=0):  # a 64-bit pg_owner's L4 pin still checks
        pae.domain.privileged = True
        pae.mmuext((MmuextCmd.PIN_L4_TABLE, pae.l4), foreigndom=guest.domid)


def test_xsa_185_a_recursive_l3_entry_is_refused_for_a_32bit_guest(hv, pae, guest):
    """get_page_from_l3e tries no linear pagetable for a PV32 domain: an L3 entry naming an L3
    (itself included) is EINVAL, at update and at validation; a 64-bit guest may."""
    l3 = pae.l4
    with fails_with(hv, Errno.EINVAL, done=0, match="L3 entry 0"):
        pae.set_entry(l3, 0, entry(l3))
    recursive = l3_with(pae, {3: entry(fresh_l2(pae))})
    pae.hv.memory.frame(recursive)[1] = entry(recursive)
    with fails_with(hv, Errno.EINVAL, done=0, match="L3 entry 1"):
        pae.pin(3, recursive)
    l3_64 = l3_with(guest, {})
    assert guest.pin(3, l3_64) == 1 and guest.set_entry(l3_64, 0, entry(l3_64)) == 1
