"""The compat ABI where it differs on the wire (docs/pv32.md sections 6-11): a 32-bit
guest's vCPU bitmaps are 32-bit words, its shared_info and vcpu_info have the compat layout, its
2-level event channels are 32 x 32, its runstate area is the packed compat struct, and its
pointers and extent-list entries are 32 bits.

Each rule is shown beside the 64-bit answer, which is unchanged. A 32-bit guest's direct map
is at PAGE_OFFSET_PAE, below 4 GiB (docs/pv32.md section 4).
"""

import struct

import pytest

from hypervisor.core import XenError
from hypervisor.core.abi import (
    COMPAT_SHARED_INFO_EVTCHN_MASK,
    COMPAT_VCPU_INFO_PENDING_SEL,
    HYPERVISOR_COMPAT_VIRT_START,
    PAGE_SHIFT,
    PAGE_SIZE,
    SHARED_INFO_EVTCHN_PENDING,
    UVMF_TLB_FLUSH,
    VCPU_INFO_SIZE,
    Errno,
    MmuextCmd,
    RUNSTATE_blocked,
)

from .conftest import fails_with, unchanged
from .guest import RW, A, D, Guest, P
from .test_evtchn_fifo import Fifo

MS = 1_000_000


def compat_guest(hv, **kw) -> Guest:
    """A 32-bit PAE guest on the compat ABI."""
    return Guest(hv, address_size=32, **kw)


def guest_of(hv, address_size: int, **kw) -> Guest:
    return Guest(hv, address_size=address_size, **kw)


def page_before_a_hole(guest: Guest) -> tuple[int, int]:
    """(va, mfn) of a fresh direct-map page whose next page is unmapped."""
    pfn, mfn = guest.alloc()
    hole, _ = guest.alloc()
    guest.set_entry(*guest.direct_l1(hole), 0)
    return guest.direct_va(pfn), mfn


def u32(hv, mfn: int, offset: int) -> int:
    return int.from_bytes(hv.memory.read(mfn, offset, 4), "little")


# -- vCPU bitmaps: 32-bit words (vcpumask_to_pcpumask) ----------------------------------------------


def _tail_mask(guest: Guest, page: int, *vcpus: int) -> int:
    """A bitmap naming `vcpus` in the last 4 bytes of `page`, whose next page is unmapped:
    a 32-bit guest's whole bitmap, half of a 64-bit guest's first word."""
    va = page + PAGE_SIZE - 4
    assert guest.store(va, sum(1 << v for v in vcpus), size=4) is None
    return va


@pytest.mark.parametrize("address_size", [32, 64])
def test_multi_flushes_read_the_vcpumask_in_the_guests_words(hv, address_size):
    """A 32-bit guest's vcpumask is one u32 (copy_from_guest_offset of unsigned int): its last 4
    bytes of a page are all of it. A 64-bit guest's u64 there runs into the unmapped page: -EINVAL."""
    guest = guest_of(hv, address_size)
    page, _ = page_before_a_hole(guest)
    mask = _tail_mask(guest, page, 1)
    for cmd, addr in ((MmuextCmd.TLB_FLUSH_MULTI, 0), (MmuextCmd.INVLPG_MULTI, page)):
        assert guest.load(page, vcpu=1) is not None and guest.domain.vcpus[1].tlb.lookup(page >> PAGE_SHIFT) is not None
        if address_size == 32:
            assert guest.mmuext((cmd, addr, mask)) == 1
            assert guest.domain.vcpus[1].tlb.lookup(page >> PAGE_SHIFT) is None
        else:
            with fails_with(hv, Errno.EINVAL, done=0, match="vCPU bitmap"):
                guest.mmuext((cmd, addr, mask))


@pytest.mark.parametrize("address_size", [32, 64])
def test_uvmf_multi_reads_the_vcpumask_in_the_guests_words(hv, address_size):
    guest = guest_of(hv, address_size)
    page, mfn = page_before_a_hole(guest)
    mask = _tail_mask(guest, page, 1)
    assert guest.load(page, vcpu=1) is not None and guest.domain.vcpus[1].tlb.lookup(page >> PAGE_SHIFT) is not None
    call = {"va": page, "val": (mfn << PAGE_SHIFT) | P | RW | A | D, "flags": mask | UVMF_TLB_FLUSH}
    if address_size == 32:
        assert guest.call("update_va_mapping", **call) == 0
        assert guest.domain.vcpus[1].tlb.lookup(page >> PAGE_SHIFT) is None
    else:
        with pytest.raises(XenError) as caught:  # Xen's order: the PTE is written, then the bitmap faults
            guest.call("update_va_mapping", **call)
        assert caught.value.errno == Errno.EFAULT


def test_a_vcpumask_pointer_beyond_4gib_is_a_fault(hv):
    """A 32-bit guest cannot name a bitmap from 4 GiB up (its bitmap at the 4 GiB alias of its
    direct map faults): -EINVAL for the MULTI flushes, -EFAULT for UVMF_MULTI."""
    guest = compat_guest(hv)
    pfn, mfn = guest.alloc()
    mask = guest.vcpumask(0, 1) + (1 << 32)
    with fails_with(hv, Errno.EINVAL, done=0, match="vCPU bitmap"):
        guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, mask))
    with pytest.raises(XenError) as caught:
        guest.call("update_va_mapping", va=guest.direct_va(pfn), val=(mfn << PAGE_SHIFT) | P | RW | A | D, flags=mask | UVMF_TLB_FLUSH)
    assert caught.value.errno == Errno.EFAULT
    sixty_four = Guest(hv)
    assert sixty_four.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, sixty_four.vcpumask(0))) == 1  # 64-bit: readable there


# -- guest addresses below 4 GiB -------------------------------------------------------------------


def test_update_va_mapping_of_an_address_beyond_4gib_is_einval(hv):
    guest = compat_guest(hv)
    pfn, mfn = guest.alloc()
    va = guest.direct_va(pfn) + (1 << 32)
    with fails_with(hv, Errno.EINVAL, match="not a guest address of a 32-bit guest"):
        guest.call("update_va_mapping", va=va, val=(mfn << PAGE_SHIFT) | P | A | D)
    sixty_four = Guest(hv)
    pfn, mfn = sixty_four.alloc()
    assert sixty_four.call("update_va_mapping", va=sixty_four.direct_va(pfn), val=(mfn << PAGE_SHIFT) | P | A | D) == 0


def test_invlpg_of_an_address_beyond_4gib_does_nothing(hv):
    """INVLPG of an address outside the guest's range is a silent no-op (the !__addr_ok branch
    of do_mmuext_op): for a 32-bit guest, anything from 4 GiB up, where a 64-bit guest's
    direct map is."""
    guest = compat_guest(hv)
    va = guest.vcpumask(0)  # a mapped direct-map page, in the TLB after a load
    assert guest.load(va) is not None
    for cmd in (MmuextCmd.INVLPG_LOCAL, MmuextCmd.INVLPG_MULTI, MmuextCmd.INVLPG_ALL):
        with unchanged(hv):
            assert guest.mmuext((cmd, va + (1 << 32), va)) == 1
        assert guest.domain.vcpus[0].tlb.lookup(va >> PAGE_SHIFT) is not None
    sixty_four = Guest(hv)
    va = sixty_four.vcpumask(0)
    assert va >= 1 << 32 and sixty_four.load(va) is not None and sixty_four.mmuext((MmuextCmd.INVLPG_LOCAL, va)) == 1
    assert sixty_four.domain.vcpus[0].tlb.lookup(va >> PAGE_SHIFT) is None


def test_a_runstate_area_must_end_below_the_compat_hypervisor_start(hv):
    """compat_vcpu_op: the u64 field must equal its u32 handle, and compat_handle_okay wants the
    area's last byte below HYPERVISOR_COMPAT_VIRT_START; -EFAULT otherwise."""
    guest = compat_guest(hv)
    for addr in (HYPERVISOR_COMPAT_VIRT_START - 43, 1 << 32, guest.vcpumask(0) + (1 << 32)):
        with fails_with(hv, Errno.EFAULT, match="32-bit guest addresses"):
            guest.vcpu_op("register_runstate_memory_area", 0, addr=addr)
    assert guest.vcpu_op("register_runstate_memory_area", 0, addr=HYPERVISOR_COMPAT_VIRT_START - 44) == 0
    assert Guest(hv).vcpu_op("register_runstate_memory_area", 0, addr=HYPERVISOR_COMPAT_VIRT_START - 43) == 0  # 64-bit: in range


# -- the compat runstate area: 44 bytes, u64s at 4-byte alignment -------------------------------------


def test_the_runstate_area_has_the_compat_layout(hv):
    guest = compat_guest(hv)
    pfn, mfn = guest.alloc()
    hv.memory.write(mfn, 0, b"\xaa" * 64)
    hv.advance_time(2 * MS)
    assert guest.vcpu_op("register_runstate_memory_area", 1, addr=guest.direct_va(pfn)) == 0
    guest.sched_op("block", caller=1)
    hv.advance_time(5 * MS)
    raw = hv.memory.read(mfn, 0, 48)
    assert struct.unpack("<IQ4Q", raw[:44]) == (RUNSTATE_blocked, 2 * MS, 2 * MS, 0, 0, 0)
    assert raw[44:] == b"\xaa" * 4  # nothing beyond the compat struct


# -- shared_info and vcpu_info: 32-bit words ----------------------------------------------------------


def _compat_sel(hv, guest: Guest, vcpu: int) -> int:
    return u32(hv, guest.domain.shared_info_mfn, VCPU_INFO_SIZE * vcpu + COMPAT_VCPU_INFO_PENDING_SEL)


def test_delivery_uses_the_compat_mask_and_selector(hv):
    """Port 40 is bit 8 of the 32-bit evtchn_mask word 1 at byte 2176, and its news is bit 1
    of the u32 evtchn_pending_sel at byte 4 of the vcpu_info (evtchn_2l_set_pending,
    evtchn_2l_unmask; BITS_PER_EVTCHN_WORD(d) is 32)."""
    guest = compat_guest(hv)
    for _ in range(39):
        guest.evtchn("alloc_unbound")
    port = guest.evtchn("bind_ipi", vcpu=1)
    assert port == 40
    shared = guest.domain.shared_info_mfn
    mask_at = COMPAT_SHARED_INFO_EVTCHN_MASK + 4 * (port // 32)
    hv.memory.write(shared, mask_at, (1 << port % 32).to_bytes(4, "little"))
    guest.evtchn("send", port=port)
    assert hv.memory.read(shared, SHARED_INFO_EVTCHN_PENDING + port // 8, 1)[0] == 1 << port % 8
    assert (_compat_sel(hv, guest, 1), guest.upcall_pending(1)) == (0, 0)  # masked: pending only
    assert guest.evtchn("unmask", port=port) == 0
    assert u32(hv, shared, mask_at) == 0 and _compat_sel(hv, guest, 1) == 1 << port // 32 and guest.upcall_pending(1) == 1
    assert guest.pending_sel(1) == 0  # the bytes a 64-bit selector would be in: the compat arch.cr2
    guest.set_upcall_mask(1, 0)
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=1) == [port]


def test_register_vcpu_info_sets_the_u32_selector(hv):
    """map_guest_area writes ~0 to the compat evtchn_pending_sel, 4 bytes at offset 4; bytes 8
    on are the compat arch_vcpu_info, copied from the old vcpu_info and left alone."""
    guest = compat_guest(hv)
    _, mfn = guest.alloc()
    assert guest.vcpu_op("register_vcpu_info", 1, mfn=mfn, offset=128) == 0
    info = hv.memory.read(mfn, 128, VCPU_INFO_SIZE)
    assert info[4:8] == b"\xff" * 4 and info[8:16] == bytes(8) and info[0] == 1  # upcall-pending
    guest.hv.memory.write(mfn, 128, bytes(8))
    port = guest.evtchn("bind_ipi", caller=1, vcpu=1)
    guest.evtchn("send", port=port)
    assert u32(hv, mfn, 128 + COMPAT_VCPU_INFO_PENDING_SEL) == 1 << port // 32


# -- 1,024 two-level ports ---------------------------------------------------------------------------


def _fill(guest: Guest, n: int) -> int:
    ports = [guest.evtchn("alloc_unbound") for _ in range(n)]
    return ports[-1]


def test_a_32bit_guest_has_1024_two_level_ports(hv):
    """max_evtchns is BITS_PER_EVTCHN_WORD(d) squared: 1,024 for a 32-bit guest, whatever its cap."""
    guest = compat_guest(hv, max_evtchn_port=4095)
    assert _fill(guest, 1023) == 1023
    with fails_with(hv, Errno.ENOSPC, match="2-level ABI 1024 ports"):
        guest.evtchn("alloc_unbound")


def test_fifo_lifts_the_two_level_bound_and_a_reset_brings_it_back(hv):
    """The FIFO ABI is the same for a 32-bit guest (its structs are checked identical,
    xen/include/xlat.lst) and has 2^17 ports; EVTCHNOP_reset returns to 2-level's 1,024."""
    guest = compat_guest(hv, max_evtchn_port=4095)
    Fifo(guest, vcpus=(0,), pages=2)
    assert _fill(guest, 1024) == 1024
    assert guest.evtchn("reset") == 0
    assert _fill(guest, 1023) == 1023
    with fails_with(hv, Errno.ENOSPC):
        guest.evtchn("alloc_unbound")


# -- memory_op extent lists: compat_pfn_t -------------------------------------------------------------


def test_an_extent_entry_beyond_32_bits_is_an_unreadable_list(hv):
    """A 32-bit guest's extent list holds u32s: an entry that does not fit is refused as a list
    Xen cannot read (compat_memory_op): the count it started from, -EFAULT for exchange."""
    guest = compat_guest(hv)
    _, mfn = guest.alloc()
    for cmd, entry in (("populate_physmap", 1 << 32), ("decrease_reservation", mfn | 1 << 32)):
        with unchanged(hv):
            answer = guest.call("memory_op", cmd=cmd, extent_start=[entry], nr_extents=1)
        assert answer["result"] == 0 and "compat_pfn_t" in answer["stopped"]
    with fails_with(hv, Errno.EFAULT, match="compat_pfn_t"):
        guest.call("memory_op", cmd="exchange", input={"extent_start": [mfn], "nr_extents": 1}, output={"extent_start": [1 << 32], "nr_extents": 1})
    answer = guest.call("memory_op", cmd="increase_reservation", extent_start=[1 << 40], nr_extents=1)  # an output list
    assert answer["result"] == 1 and answer["extent_start"][0] < 1 << 32
