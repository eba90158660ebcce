"""Xen's reserved L4 slots 256..271: whatever a guest leaves there is clobbered when the frame
becomes an L4, never walked, and nothing in Xen's range is a guest address
(xen/arch/x86/mm.c init_xen_l4_slots, promote_l4_table; asm/x86_64/uaccess.h __addr_ok).

The attack these tests pin down: a guest writes a fake L3 -> L2 -> L1 chain of its own plain
pages into slot 256 of a plain page whose L1 maps another domain's frames, makes the page
read-only, has it validated as an L4 (pin or base load) and then loads and stores at
0xFFFF800000000000.
"""

import numpy as np
import pytest

from hypervisor.core import XenError, audit
from hypervisor.core.abi import (
    HYPERVISOR_L4_FIRST,
    HYPERVISOR_L4_LAST,
    HYPERVISOR_VIRT_END,
    HYPERVISOR_VIRT_START,
    L4_SLOT_LINEAR,
    PAGE_SHIFT,
    Errno,
    MmuextCmd,
)
from hypervisor.core.abi import PFEC_page_present as PF_P
from hypervisor.core.abi import PFEC_user_mode as PF_U
from hypervisor.core.abi import PFEC_write_access as PF_W
from hypervisor.core.cpu import PageFault
from hypervisor.core.tlb import TlbEntry

from .conftest import fails_with, unchanged
from .guest import RW, TABLE, US, A, D, P

SECRET = 0x5EC2E7
XEN_SLOTS = range(HYPERVISOR_L4_FIRST, HYPERVISOR_L4_LAST + 1)
LEAF = P | RW | US | A | D
# Through Xen's linear self-map (slot 258) to the boot L3, L2 and first L1: all present, so an
# unchecked walk would translate it.
LINEAR_VA = 0xFFFF000000000000 | (L4_SLOT_LINEAR << 39) | (272 << 30)


def fake_chain(guest, targets: list[int]) -> int:
    """An L3 -> L2 -> L1 chain of the guest's own plain pages (every entry of the L3 and the
    L2 names the next) whose L1 maps `targets` (mfns) writable at entries 0, 1, ...; returns
    the L3's mfn. Nothing validates plain pages."""
    _, l1 = guest.new_table({i: (mfn << PAGE_SHIFT) | LEAF for i, mfn in enumerate(targets)})
    _, l2 = guest.new_table(dict.fromkeys(range(512), (l1 << PAGE_SHIFT) | TABLE | US))
    _, l3 = guest.new_table(dict.fromkeys(range(512), (l2 << PAGE_SHIFT) | TABLE | US))
    return l3


def rogue_l4(guest, entries: dict[int, int]) -> int:
    """A plain page holding `entries`, made read-only so that it may become an L4."""
    pfn, l4 = guest.new_table(entries)
    guest.make_readonly(pfn)
    return l4


def make_base(guest, l4: int, base: str) -> dict:
    """Validate `l4` as the issue's attacker did and return how to access through it: pinned
    or not (then the load validates it), loaded as vCPU 0's user or kernel base."""
    if base.startswith("pinned"):
        guest.pin(4, l4)
    if base.endswith("user"):
        guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, l4))
        return {"user": True}
    guest.new_baseptr(l4)
    return {}


def victim_state(hv, other, *mfns: int) -> tuple:
    return tuple((hv.memory.snapshot(m).tobytes(), hv.frame_info(m)) for m in mfns) + (other.load(other.direct_va(0)),)


@pytest.mark.parametrize("base", ["pinned user", "pinned kernel", "user", "kernel"])
def test_chain_left_in_slot_256_reaches_no_other_domain(hv, guest, other, base):
    secret_pfn, secret = other.new_data_page(SECRET)
    l4 = rogue_l4(guest, {HYPERVISOR_L4_FIRST: (fake_chain(guest, [secret, other.l4]) << PAGE_SHIFT) | TABLE | US})
    before = victim_state(hv, other, secret, other.l4)
    mode = make_base(guest, l4, base)
    user = PF_U if mode.get("user") else 0
    va = HYPERVISOR_VIRT_START
    if user:
        detail = f"va {va:#x} is in Xen's range: L4 entry {HYPERVISOR_L4_FIRST} of mfn {l4:#x} is not present"
        assert guest.load(va, **mode) == PageFault(va, user, detail)
        assert isinstance(guest.access("read", va=va, length=64, **mode), PageFault)
    else:  # a kernel base maps Xen's read-only M2P there (fill_ro_mpt), not the guest's chain
        assert guest.load(va) == int(hv.m2p[0])
        assert guest.access("read", va=va, length=64) == hv.m2p[:8].astype("<u8").tobytes()
    assert guest.store(va, 0, **mode).error_code & ~PF_P == PF_W | user
    assert guest.atomic("xchg", va, 0, **mode).error_code & ~PF_P == PF_W | user
    assert isinstance(guest.access("write", va=va + 4096 + 8 * 272, data=bytes(8), **mode), PageFault)  # the victim's L4, slot 272
    assert victim_state(hv, other, secret, other.l4) == before
    assert other.load(other.direct_va(secret_pfn)) == SECRET
    assert audit(hv) == []


def test_promotion_writes_every_xen_slot_and_takes_no_reference(hv, guest, other):
    """Xen's values replace the guest's in all sixteen slots; the frames the guest named there
    (its own, another domain's, Xen's, past the end of RAM) gain no reference, and keep none
    after the table is unpinned (demotion skips Xen's slots)."""
    _, secret = other.new_data_page(SECRET)
    chain = fake_chain(guest, [secret])
    named = [chain, secret, other.l4, 3, hv.nr_frames + 5]
    garbage = {slot: (named[i % len(named)] << PAGE_SHIFT) | TABLE | US for i, slot in enumerate(XEN_SLOTS)}
    l4 = rogue_l4(guest, garbage)
    counts = [hv.frame_info(m) for m in named[:-1]]
    guest.pin(4, l4)
    xen = hv.pagetables.xen_l4_entries(l4)
    assert hv.memory.entries(l4)[HYPERVISOR_L4_FIRST : HYPERVISOR_L4_LAST + 1].tolist() == xen.tolist()
    assert int(xen[L4_SLOT_LINEAR - HYPERVISOR_L4_FIRST]) >> PAGE_SHIFT & ((1 << 40) - 1) == l4
    assert not (xen & np.uint64(US)).any(), "no Xen slot is guest-accessible"
    assert [hv.frame_info(m) for m in named[:-1]] == counts
    guest.unpin(l4)
    assert [hv.frame_info(m) for m in named[:-1]] == counts
    assert hv.memory.entries(l4)[HYPERVISOR_L4_FIRST : HYPERVISOR_L4_LAST + 1].tolist() == xen.tolist()


@pytest.mark.parametrize("slot", [HYPERVISOR_L4_FIRST, L4_SLOT_LINEAR, 260, HYPERVISOR_L4_LAST])
def test_slot_past_ram_is_no_simulator_bug(hv, guest, slot):
    """A Xen slot naming a frame past the end of machine memory: accepted (never looked at),
    clobbered, and an access there is the guest's page fault, not a bug of the simulator."""
    l4 = rogue_l4(guest, {slot: ((hv.nr_frames + 7) << PAGE_SHIFT) | TABLE | US})
    guest.pin(4, l4)
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, l4))
    va = 0xFFFF000000000000 | slot << 39
    assert isinstance(guest.load(va, user=True), PageFault)
    assert isinstance(guest.store(va, 1), PageFault)


@pytest.mark.parametrize("va", [HYPERVISOR_VIRT_START, LINEAR_VA, 0xFFFF830000000000, HYPERVISOR_VIRT_END - 8], ids=hex)
@pytest.mark.parametrize("user", [False, True])
def test_xens_range_faults_whatever_the_base_holds_there(hv, guest, other, va, user):
    """Xen's own entry answers an access to Xen's range, not the base's slot: with a USER
    chain to another domain's frame planted in every Xen slot of the live base (as if
    promotion had not clobbered them), every access still faults, with P where Xen's entry is
    present (xen/arch/x86/traps.c fixup_page_fault hands faults in Xen's range to the guest),
    and update_va_mapping there is -EINVAL (access_ok)."""
    _, secret = other.new_data_page(SECRET)
    chain = (fake_chain(guest, [secret] * 512) << PAGE_SHIFT) | TABLE | US
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, guest.l4))
    slot = (va >> 39) & 511
    present = PF_P if int(hv.pagetables.xen_l4_entries(guest.l4)[slot - HYPERVISOR_L4_FIRST]) & P else 0
    u = PF_U if user else 0
    words = hv.memory.frame(guest.l4)
    xen = words[XEN_SLOTS.start : XEN_SLOTS.stop].copy()
    words[XEN_SLOTS.start : XEN_SLOTS.stop] = chain
    try:
        with unchanged(hv):
            assert guest.load(va, user=user).error_code == present | u
            assert guest.store(va, 1, user=user).error_code == present | u | PF_W
            assert guest.atomic("fetch_add", va, 1, user=user).error_code == present | u | PF_W
            assert guest.access("read", va=va, length=8, user=user).error_code == present | u
            assert guest.access("write", va=va, data=b"x", user=user).error_code == present | u | PF_W
        with fails_with(hv, Errno.EINVAL, match="not a guest address"):
            guest.call("update_va_mapping", va=va, val=0)
    finally:
        words[XEN_SLOTS.start : XEN_SLOTS.stop] = xen


def test_xen_reads_no_vcpu_bitmap_in_its_own_range(hv, guest):
    """copy_from_guest refuses an address outside the guest's range (access_ok) even where
    Xen's linear map would translate it: -EINVAL from mmuext_op, -EFAULT from
    update_va_mapping after its PTE update (xen/arch/x86/mm.c vcpumask_to_pcpumask)."""
    with fails_with(hv, Errno.EINVAL, match="vCPU bitmap"):
        guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, LINEAR_VA))
    pfn, mfn = guest.alloc()
    l1, index = guest.direct_l1(pfn)
    with pytest.raises(XenError) as caught:
        guest.call("update_va_mapping", va=guest.direct_va(pfn), val=(mfn << PAGE_SHIFT) | P | A | D, flags=1 | LINEAR_VA)
    assert caught.value.errno == Errno.EFAULT
    assert int(hv.memory.entries(l1)[index]) & RW == 0, "the PTE was updated before the bitmap read"


# -- the reachability audit ----------------------------------------------------------------------


def reach_findings(hv) -> list[str]:
    return [f for f in audit(hv) if "reaches" in f or "Xen's" in f or "TLB" in f]


def test_audit_names_the_path_to_another_domains_frame(hv, guest, other):
    _, secret = other.new_data_page(SECRET)
    l1, index = guest.direct_l1(40)
    words = hv.memory.frame(l1)
    kept = int(words[index])
    words[index] = (secret << PAGE_SHIFT) | LEAF
    try:
        found = reach_findings(hv)
    finally:
        words[index] = kept
    l3 = int(hv.memory.entries(guest.l4)[272]) >> PAGE_SHIFT & ((1 << 40) - 1)
    l2 = int(hv.memory.entries(l3)[0]) >> PAGE_SHIFT & ((1 << 40) - 1)
    path = f"L4 mfn {guest.l4:#x} entry 272 -> L3 mfn {l3:#x} entry 0 -> L2 mfn {l2:#x} entry 0 -> L1 mfn {l1:#x} entry {index}"
    assert f"dom{guest.domid} vCPU 0 kernel base: {path} reaches mfn {secret:#x} owned by dom{other.domid}" in found
    assert f"dom{guest.domid} pinned L4 mfn {guest.l4:#x}: {path} reaches mfn {secret:#x} owned by dom{other.domid}" not in found, "one path per entry"


def test_audit_reports_an_entry_past_ram_and_a_changed_xen_slot(hv, guest):
    l1, index = guest.direct_l1(40)
    words = hv.memory.frame(l1)
    kept = int(words[index]), int(hv.memory.entries(guest.l4)[HYPERVISOR_L4_FIRST])
    words[index] = ((hv.nr_frames + 1) << PAGE_SHIFT) | LEAF
    hv.memory.frame(guest.l4)[HYPERVISOR_L4_FIRST] = (guest.mfn(3) << PAGE_SHIFT) | TABLE | US
    try:
        found = reach_findings(hv)
    finally:
        words[index] = kept[0]
        hv.memory.frame(guest.l4)[HYPERVISOR_L4_FIRST] = kept[1]
    assert any(f.endswith(f"entry {index} reaches mfn {hv.nr_frames + 1:#x} outside machine memory") for f in found), found
    assert any(f"L4 mfn {guest.l4:#x} slot {HYPERVISOR_L4_FIRST} holds" in f and "not Xen's" in f for f in found), found


def test_audit_reports_a_tlb_entry_of_another_domains_frame(hv, guest, other):
    _, secret = other.new_data_page(SECRET)
    tlb = guest.domain.vcpus[1].tlb
    va = 0x400000
    tlb.fill(va >> PAGE_SHIFT, TlbEntry(secret, P | RW | US, False, True))
    try:
        found = reach_findings(hv)
    finally:
        tlb.flush()
    assert f"dom{guest.domid} vCPU 1 TLB: va {va:#x} maps mfn {secret:#x} owned by dom{other.domid}" in found


def test_audit_walks_a_pinned_l1_no_base_reaches(hv, guest, other):
    """Pinned tables are roots of their own, walked at their level."""
    _, secret = other.new_data_page(SECRET)
    pfn, l1 = guest.new_table()
    guest.make_readonly(pfn)
    guest.pin(1, l1)
    hv.memory.frame(l1)[3] = (secret << PAGE_SHIFT) | P | US | A
    try:
        found = reach_findings(hv)
    finally:
        hv.memory.frame(l1)[3] = 0
    assert found == [f"dom{guest.domid} pinned L1 mfn {l1:#x}: L1 mfn {l1:#x} entry 3 reaches mfn {secret:#x} owned by dom{other.domid}"]
