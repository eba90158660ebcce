"""The read-only M2P Xen maps for every PV guest (docs/xen.md section 22): slot 256 of a kernel
base maps machine_to_phys_mapping at RO_MPT_VIRT_START, readable by the guest, read-only,
reflecting every M2P change at once; a table never loaded as a kernel base has it empty
(xen/arch/x86/mm.c init_xen_l4_slots, fill_ro_mpt, new_guest_cr3)."""

import pytest

from hypervisor.core.abi import INVALID_M2P, INVALID_MFN, L4_SLOT_RO_MPT, RO_MPT_VIRT_START, MmuextCmd, VMASST_CMD_enable, VMASST_TYPE_m2p_strict
from hypervisor.core.abi import PFEC_page_present as PF_P
from hypervisor.core.abi import PFEC_user_mode as PF_U
from hypervisor.core.abi import PFEC_write_access as PF_W
from hypervisor.core.cpu import PageFault

from .conftest import unchanged


def m2p_va(mfn: int) -> int:
    return RO_MPT_VIRT_START + 8 * mfn


def fresh_l4(guest) -> int:
    """A copy of the boot L4's guest slots in a fresh read-only page, not yet validated."""
    pfn, mfn = guest.alloc()
    guest.hv.memory.frame(mfn)[272] = guest.hv.memory.entries(guest.l4)[272]
    guest.make_readonly(pfn)
    return mfn


def test_kernel_reads_mfn_to_pfn(hv, guest, other):
    """Each mfn's entry: the guest's own frames give their pfn, other domains' frames theirs,
    a free frame INVALID_M2P_ENTRY (Xen's M2P is global and readable by every PV guest)."""
    pfn, mfn = guest.alloc()
    assert guest.load(m2p_va(mfn)) == pfn
    assert guest.load(m2p_va(other.mfn(7))) == 7
    free = int(next(m for m in range(hv.nr_frames) if hv.frames.owner[m] < 0))
    assert guest.load(m2p_va(free)) == INVALID_M2P
    assert guest.load(m2p_va(mfn) + 4, size=4) == 0, "the high half of a small pfn"
    assert guest.access("read", va=m2p_va(mfn), length=16) == pfn.to_bytes(8, "little") + (pfn + 1 if guest.mfn(pfn + 1) == mfn + 1 else int(hv.m2p[mfn + 1])).to_bytes(8, "little")


def test_machphys_update_shows_at_once(hv, guest):
    pfn, mfn = guest.alloc()
    assert guest.load(m2p_va(mfn)) == pfn
    guest.machphys(mfn, 0x1234)
    assert guest.load(m2p_va(mfn)) == 0x1234


@pytest.mark.parametrize("op", ["store", "atomic", "write"])
def test_stores_fault_and_change_nothing(hv, guest, op):
    _, mfn = guest.alloc()
    va = m2p_va(mfn)
    with unchanged(hv):
        if op == "store":
            fault = guest.store(va, 1)
        elif op == "atomic":
            fault = guest.atomic("xchg", va, 1)
        else:
            fault = guest.access("write", va=va, data=b"\x01")
    assert fault.error_code == PF_P | PF_W
    assert "maps Xen's M2P read-only" in fault.detail


def test_past_the_machines_frames_is_a_hole(hv, guest):
    va = m2p_va(hv.nr_frames)
    assert guest.load(va) == PageFault(va, 0, f"va {va:#x} is in Xen's range: L4 entry 256 of mfn {guest.l4:#x} maps Xen's M2P, which has no entry there (the machine has {hv.nr_frames:#x} frames)")
    assert isinstance(guest.load(m2p_va(INVALID_MFN)), PageFault)


def test_only_a_table_loaded_as_kernel_base_maps_it(hv, guest):
    """Promotion leaves slot 256 empty; NEW_BASEPTR fills it; NEW_USER_BASEPTR does not (no
    m2p_strict), so a user-only base faults there; a table once a kernel base keeps it until
    it is promoted again."""
    l4 = fresh_l4(guest)
    guest.pin(4, l4)
    assert hv.memory.entries(l4).item(L4_SLOT_RO_MPT) == 0
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, l4))
    fault = guest.load(RO_MPT_VIRT_START, user=True)
    assert fault == PageFault(RO_MPT_VIRT_START, PF_U, f"va {RO_MPT_VIRT_START:#x} is in Xen's range: L4 entry 256 of mfn {l4:#x} is not present")
    guest.new_baseptr(l4)
    assert hv.memory.entries(l4).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry
    assert guest.load(RO_MPT_VIRT_START, user=True) == int(hv.m2p[0]), "the user base is the same table now"
    guest.new_baseptr(guest.l4)
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, 0))
    guest.unpin(l4)  # devalidated: its slots stay as they were until it is promoted again
    guest.pin(4, l4)
    assert hv.memory.entries(l4).item(L4_SLOT_RO_MPT) == 0


def test_vcpu_initialise_fills_the_kernel_base(hv, guest):
    from .guest import Guest

    two = Guest(hv, nr_vcpus=2, online=1)
    l4 = fresh_l4(two)
    two.vcpu_op("initialise", 1, context={"flags": 1 << 2 | 1 << 5, "ctrlreg3": l4})
    assert hv.memory.entries(l4).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry
    assert two.load(m2p_va(two.mfn(3)), vcpu=1) == 3


def test_the_builder_maps_it_for_vcpu_0(hv, guest):
    assert hv.memory.entries(guest.l4).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry


def test_m2p_strict_maps_it_at_promotion_and_zaps_it_in_user_bases(hv, guest):
    """VMASST m2p_strict (docs/xen.md section 22): init_xen_l4_slots fills slot 256 when it
    promotes an L4, MMUEXT_NEW_USER_BASEPTR zaps it in the new user base, so user mode cannot
    read the M2P while the kernel can, and NEW_BASEPTR fills nothing (the table has it)."""
    guest.call("vm_assist", cmd=VMASST_CMD_enable, type=VMASST_TYPE_m2p_strict)
    kernel, user = fresh_l4(guest), fresh_l4(guest)
    guest.pin(4, kernel)
    guest.pin(4, user)
    assert hv.memory.entries(kernel).item(L4_SLOT_RO_MPT) == hv.memory.entries(user).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, user))
    assert hv.memory.entries(user).item(L4_SLOT_RO_MPT) == 0
    assert guest.load(RO_MPT_VIRT_START, user=True) == PageFault(RO_MPT_VIRT_START, PF_U, f"va {RO_MPT_VIRT_START:#x} is in Xen's range: L4 entry 256 of mfn {user:#x} is not present")
    guest.new_baseptr(kernel)
    assert guest.load(RO_MPT_VIRT_START) == int(hv.m2p[0])
    guest.new_baseptr(guest.l4)
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, 0))


def test_m2p_strict_zaps_the_user_base_vcpu_initialise_gives(hv, guest):
    """arch_set_info_guest does as NEW_BASEPTR and NEW_USER_BASEPTR do: slot 256 of its
    ctrlreg1 is emptied for an m2p_strict guest, and its ctrlreg3 keeps the entry promotion
    wrote."""
    from .guest import Guest

    two = Guest(hv, nr_vcpus=2, online=1)
    two.call("vm_assist", cmd=VMASST_CMD_enable, type=VMASST_TYPE_m2p_strict)
    kernel, user = fresh_l4(two), fresh_l4(two)
    two.vcpu_op("initialise", 1, context={"flags": 1 << 2 | 1 << 5, "ctrlreg3": kernel, "ctrlreg1": user})
    assert hv.memory.entries(kernel).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry
    assert hv.memory.entries(user).item(L4_SLOT_RO_MPT) == 0
