"""32-bit PAE PV guests beside 64-bit ones (docs/pv32.md): the start of day, the base pointer
and pins of a PAE L3, and accesses through a PV32 vCPU, its hole included."""

import numpy as np
import pytest

from hypervisor.core import XenError, audit
from hypervisor.core.abi import (
    HYPERVISOR_COMPAT_VIRT_START,
    L2_SLOT_COMPAT_XEN_FIRST,
    PAGE_OFFSET_PAE,
    PAGE_SHIFT,
    START_INFO_MAGIC_PAE,
    Errno,
    MmuextCmd,
    PageType,
    PFEC_page_present,
    PFEC_user_mode,
    PFEC_write_access,
    VGCF_in_kernel,
    VGCF_online,
)
from hypervisor.core.cpu import PageFault
from hypervisor.core.frames import PAE_XEN_L2, PINNED, VALIDATED

from .conftest import fails_with
from .guest import RW, TABLE, US, A, D, Guest, P

PAE_TABLE = TABLE | US  # how the toolstack and Linux write a PAE guest's L2/L3 entries


@pytest.fixture
def pae(hv):
    return Guest(hv, address_size=32)


def pae_pgd(guest: Guest, user_pages: dict[int, int] | None = None, user_va: int = 0x400000) -> dict:
    """A PAE pgd as 32-bit Linux with shared_kernel_pmd = 0 builds one: an L3 whose slot 0
    maps `user_pages` (va -> mfn) through a fresh L2 and L1, and whose slot 3 holds a fresh
    copy of the boot kernel pmd (its guest slots); every table read-only in the direct map."""
    l1_pfn, l1 = guest.new_table({(va >> 12) & 511: (m << PAGE_SHIFT) | P | RW | US | A | D for va, m in (user_pages or {}).items()})
    l2_pfn, l2 = guest.new_table({(user_va >> 21) & 511: (l1 << PAGE_SHIFT) | PAE_TABLE})
    boot_l2 = guest.hv.memory.entries(guest.hv.memory.entries(guest.l4).item(3) >> PAGE_SHIFT)
    kernel_pfn, kernel_l2 = guest.new_table({i: int(boot_l2[i]) for i in range(L2_SLOT_COMPAT_XEN_FIRST) if int(boot_l2[i]) & P})
    l3_pfn, l3 = guest.new_table({(user_va >> 30): (l2 << PAGE_SHIFT) | PAE_TABLE, 3: (kernel_l2 << PAGE_SHIFT) | PAE_TABLE})
    tree = {"l3": l3, "l2": l2, "kernel_l2": kernel_l2, "l1": l1, "pfns": [l3_pfn, l2_pfn, kernel_pfn, l1_pfn]}
    for pfn in tree["pfns"]:
        guest.make_readonly(pfn)
    return tree


def test_a_32bit_domain_is_built_beside_a_64bit_one_with_xens_pae_start_of_day(hv, guest, pae):
    """The PAE start of day (tools' xg_dom_x86.c): start-info names the L3 at the direct map
    from 0xC0000000; the toolstack pinned the L3, whose entries 4..511 are zero, whose slot 3
    holds the one L2 (PAE_XEN_L2, Xen's slots filled) with US|RW added; each vCPU has a compat
    L4 of Xen's whose slot 0 holds vCPU 0's L3."""
    assert (guest.domain.info()["address_size"], pae.domain.info()["address_size"]) == (64, 32)
    info = pae.start_info
    l3 = info["pt_base_mfn"]
    assert info["pt_base"] == PAGE_OFFSET_PAE + (((info["pt_base"] - PAGE_OFFSET_PAE) >> PAGE_SHIFT) << PAGE_SHIFT)
    assert hv.memory.read(pae.mfn(0), 0, len(START_INFO_MAGIC_PAE)) == START_INFO_MAGIC_PAE
    frames = hv.frames
    assert PageType(frames.type[l3]) == PageType.L3 and frames.flags[l3] & (VALIDATED | PINNED) == VALIDATED | PINNED
    words = hv.memory.entries(l3)
    assert not words[4:].any() and not words[:3].any()
    assert int(words[3]) & (US | RW) == US | RW
    l2 = int(words[3]) >> PAGE_SHIFT & ((1 << 40) - 1)
    assert frames.flags[l2] & PAE_XEN_L2 and frames.type_count[l2] == 1
    assert (hv.memory.entries(l2)[L2_SLOT_COMPAT_XEN_FIRST:] == hv.pagetables.compat_xen_l2).all()
    vcpus = pae.domain.vcpus
    assert all(v.compat_l4 and frames.owner[v.compat_l4] != pae.domid for v in vcpus)
    assert hv.memory.entries(vcpus[0].compat_l4).item(0) >> PAGE_SHIFT == l3 and vcpus[1].guest_table == l3
    assert guest.domain.vcpus[0].compat_l4 == 0


def test_loads_and_stores_go_through_the_pae_tables_and_each_domain_sees_its_own(guest, pae):
    pfn, mfn = pae.alloc()
    assert pae.store(pae.direct_va(pfn), 0x1234_5678_9ABC_DEF0) is None
    assert pae.load(pae.direct_va(pfn)) == 0x1234_5678_9ABC_DEF0
    assert int(np.frombuffer(pae.hv.memory.read(mfn, 0, 8), "<u8")[0]) == 0x1234_5678_9ABC_DEF0
    assert pae.load(pae.direct_va(pfn) + 4, size=4) == 0x12345678
    other_pfn, _ = guest.new_data_page(7)
    assert guest.load(guest.direct_va(other_pfn)) == 7 and pae.load(pae.direct_va(pfn)) == 0x1234_5678_9ABC_DEF0


def test_the_pae_kernel_runs_in_ring_1_so_only_user_accesses_need_user(pae):
    """Xen adds nothing to a PV32 L1 entry: a kernel page (no USER) is the kernel's alone."""
    pfn, mfn = pae.alloc()
    l1, index = pae.direct_l1(pfn)
    pae.set_entry(l1, index, (mfn << PAGE_SHIFT) | P | RW | A | D)
    assert pae.hv.memory.entries(l1).item(index) == (mfn << PAGE_SHIFT) | P | RW | A | D  # stored as written
    assert pae.store(pae.direct_va(pfn), 5) is None
    fault = pae.load(pae.direct_va(pfn), user=True)
    assert isinstance(fault, PageFault) and fault.error_code == PFEC_page_present | PFEC_user_mode
    pae.set_entry(l1, index, (mfn << PAGE_SHIFT) | P | RW | US | A | D)
    pae.call("mmuext_op", ops=[[MmuextCmd.TLB_FLUSH_LOCAL, 0, 0]])
    assert pae.load(pae.direct_va(pfn), user=True) == 5


def test_the_hole_at_the_top_of_4gib_is_xens_the_compat_m2p_readable_by_the_kernel_alone(hv, pae):
    mfn = pae.mfn(5)
    va = HYPERVISOR_COMPAT_VIRT_START + 4 * mfn
    assert pae.load(va, size=4) == 5
    for args, code in (({"value": 1, "size": 4}, PFEC_page_present | PFEC_write_access), ({"user": True, "size": 4}, PFEC_page_present | PFEC_user_mode)):
        op = pae.store if "value" in args else pae.load
        fault = op(va, **args)
        assert isinstance(fault, PageFault) and fault.error_code == code, fault
    fault = pae.load(0xFFF00000, size=4)
    assert isinstance(fault, PageFault) and fault.error_code == 0
    with fails_with(hv, Errno.EINVAL, match="32-bit address"):
        pae.load(1 << 32)


def test_a_pae_l3_is_pinned_loaded_and_initialised_as_the_base_and_pin_l4_is_ignored(hv, pae):
    data_pfn, data = pae.new_data_page(0)
    pfn2, page = pae.alloc()
    tree = pae_pgd(pae, {0x400000: page})
    assert pae.pin(3, tree["l3"]) == 1
    assert hv.frames.flags[tree["kernel_l2"]] & PAE_XEN_L2
    assert pae.pin(4, tree["l3"]) == 1  # a 32-bit pg_owner: ignored, rc 0, nothing changes
    assert not hv.frames.flags[tree["l3"]] & PAE_XEN_L2 and hv.frames.type_count[tree["l3"]] == 1
    assert pae.new_baseptr(tree["l3"]) == 1
    vcpu = pae.domain.vcpus[0]
    assert vcpu.guest_table == tree["l3"] and hv.memory.entries(vcpu.compat_l4).item(0) >> PAGE_SHIFT == tree["l3"]
    assert pae.store(0x400000, 9, user=True) is None and pae.load(pae.direct_va(pfn2)) == 9
    assert pae.load(pae.direct_va(data_pfn)) == 0  # the kernel half came along
    with fails_with(hv, Errno.EINVAL, match="no user base"):
        pae.mmuext((MmuextCmd.NEW_USER_BASEPTR, tree["l3"]))


def test_vcpuop_initialise_takes_a_pae_l3(hv):
    pae = Guest(hv, address_size=32, online=1)
    tree = pae_pgd(pae)
    pae.vcpu_op("initialise", 1, context={"flags": VGCF_in_kernel | VGCF_online, "ctrlreg3": tree["l3"], "ctrlreg1": tree["l3"]})
    vcpu = pae.domain.vcpus[1]
    assert (vcpu.guest_table, vcpu.guest_table_user) == (tree["l3"], 0)
    assert hv.memory.entries(vcpu.compat_l4).item(0) >> PAGE_SHIFT == tree["l3"]
    assert hv.frames.type[tree["l3"]] == PageType.L3 and hv.frames.type_count[tree["l3"]] == 1


def test_destroying_a_32bit_domain_frees_every_frame_and_its_compat_l4s(hv, guest):
    free = hv.frames.free_frames()
    pae = Guest(hv, address_size=32)
    compat = [v.compat_l4 for v in pae.domain.vcpus]
    result = hv.toolstack("destroy_domain", domid=pae.domid)
    assert result == {"freed_frames": pae.domain.nr_pages + 1, "quarantined_frames": []}
    assert hv.frames.free_frames() == free and all(hv.frames.owner[c] == -1 for c in compat)


def test_a_64bit_guest_cannot_take_a_pae_l3_nor_a_32bit_one_an_l4(hv, guest, pae):
    with fails_with(hv, Errno.EINVAL, match="not owned"):
        guest.new_baseptr(pae.l4)
    with fails_with(hv, Errno.EINVAL, match="not owned"):
        pae.new_baseptr(guest.l4)
    l3_pfn, l3 = pae.alloc()
    pae.make_readonly(l3_pfn)
    with fails_with(hv, Errno.EINVAL, match="slot 3's L2"):  # the PAE rules are the 32-bit domain's alone
        pae.new_baseptr(l3)
    empty_pfn, empty = guest.alloc()
    guest.make_readonly(empty_pfn)
    assert guest.pin(3, empty) == 1


def test_the_stale_tlb_oracle_sees_a_32bit_guests_missing_flush(hv, pae):
    """A PV32 TLB entry remembers its L3 and L1 entry as a 64-bit one its L4: a remap without a
    flush is a counted stale hit, and a fault with strict_tlb."""
    _, a = pae.new_data_page(0xA)
    _, b = pae.new_data_page(0xB)
    tree = pae_pgd(pae, {0x400000: a})
    assert pae.pin(3, tree["l3"]) == 1 and pae.new_baseptr(tree["l3"], vcpu=1) == 1
    vcpu1 = pae.domain.vcpus[1]
    assert pae.load(0x400000, vcpu=1, user=True) == 0xA
    pae.set_entry(tree["l1"], 0, (b << PAGE_SHIFT) | P | RW | US | A | D)  # an L1 update: no flush
    assert pae.load(0x400000, vcpu=1, user=True) == 0xA and vcpu1.stale_tlb_hits == 1
    assert list(vcpu1.stale_tlb_records)[-1] == {"va": 0x400000, "mfn": a, "current_mfn": b, "write": False, "user": True}
    hv.strict_tlb = True
    fault = pae.load(0x400000, vcpu=1, user=True)
    assert isinstance(fault, PageFault) and "stale TLB entry" in fault.detail
    assert pae.load(0x400000, vcpu=1, user=True) == 0xB


def test_a_mixed_machine_traces_and_replays_to_the_same_state():
    from io import BytesIO

    from hypervisor.core import Hypervisor
    from hypervisor.core.trace import TraceWriter, replay, state_digest

    hv = Hypervisor(nr_frames=1 << 13)
    out = BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)
    pae, wide = Guest(hv, address_size=32), Guest(hv)
    tree = pae_pgd(pae, {0x400000: pae.alloc()[1]})
    pae.pin(3, tree["l3"])
    pae.new_baseptr(tree["l3"], vcpu=1)
    pae.store(0x400000, 0x32, vcpu=1, user=True)
    pae.unpin(tree["l3"])
    with pytest.raises(XenError):
        pae.set_entry(tree["l3"], 3, 0)  # slot 3: EINVAL, part of the record
    wide.store(wide.direct_va(wide.alloc()[0]), 0x64)
    hv.toolstack("destroy_domain", domid=pae.domid)
    writer.close()
    report, replayed = replay(BytesIO(out.getvalue()))
    assert report.ok and report.digest_matched and state_digest(replayed) == state_digest(hv)


def test_audit_finds_a_compat_l4_that_lost_its_l3_and_a_pae_kernel_reaching_a_foreign_frame(hv, pae, guest):
    l2 = hv.memory.entries(pae.l4).item(3) >> PAGE_SHIFT & ((1 << 40) - 1)
    hv.memory.frame(l2)[L2_SLOT_COMPAT_XEN_FIRST] = 0
    assert any(f"PAE_XEN_L2 mfn {l2:#x} slot {L2_SLOT_COMPAT_XEN_FIRST}" in f for f in audit(hv))
    hv.memory.frame(l2)[L2_SLOT_COMPAT_XEN_FIRST] = hv.pagetables.compat_xen_l2[0]
    vcpu = pae.domain.vcpus[0]
    hv.memory.frame(vcpu.compat_l4)[0] = 0
    assert any("compat L4" in f for f in audit(hv))
    hv.memory.frame(vcpu.compat_l4)[0] = (vcpu.guest_table << PAGE_SHIFT) | P | RW | US | A
    l1, index = pae.direct_l1(pae.start_info["first_free_pfn"])
    hv.memory.frame(l1)[index] = (guest.mfn(0) << PAGE_SHIFT) | P | A  # behind Xen's back, no USER: the ring-1 kernel reaches it
    found = [f for f in audit(hv) if "reaches mfn" in f]
    assert found and "kernel base" in found[0]
    hv.memory.frame(l1)[index] = (pae.mfn(pae.start_info["first_free_pfn"]) << PAGE_SHIFT) | P | RW | A | D


def test_a_trace_started_on_a_running_32bit_guest_replays_from_its_snapshot():
    from io import BytesIO

    from hypervisor.core import Hypervisor
    from hypervisor.core.trace import TraceWriter, replay, state_digest

    hv = Hypervisor(nr_frames=1 << 13)
    pae = Guest(hv, address_size=32)
    tree = pae_pgd(pae, {0x400000: pae.alloc()[1]})
    out = BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)  # the 32-bit domain and its compat L4s are only in the snapshot
    pae.new_baseptr(tree["l3"])
    pae.store(0x400000, 0x32, user=True)
    writer.close()
    report, replayed = replay(BytesIO(out.getvalue()))
    assert report.ok and report.snapshot and report.digest_matched and state_digest(replayed) == state_digest(hv)
    assert replayed.domains[pae.domid].vcpus[0].mode.pv32


def test_a_pae_kernel_store_into_its_read_only_l1_is_emulated_and_checked(hv, pae, guest):
    """ptwr (writable pagetables) through the PAE walk: the entry is stored as written (no
    64-bit adjustment), and one mapping another domain's frame is refused (the #PF stands)."""
    pfn, mfn = pae.alloc()
    l1, index = pae.direct_l1(pfn)
    l1_va = pae.direct_va(int(hv.m2p[l1]))
    new = (mfn << PAGE_SHIFT) | P | A | D
    assert pae.store(l1_va + 8 * index, new) is None
    assert hv.memory.entries(l1).item(index) == new
    fault = pae.store(l1_va + 8 * index, (guest.mfn(0) << PAGE_SHIFT) | P | A)
    assert isinstance(fault, PageFault) and fault.error_code == PFEC_page_present | PFEC_write_access
    assert hv.memory.entries(l1).item(index) == new
