"""The vCPU's memory path: walks, faults, A/D bits, modes, the stale-TLB oracle, ptwr, phys
access (docs/xen.md sections 2.5, 7, 9.2, 10, 17; pv/ro-page-fault.c)."""

import io
from dataclasses import asdict

import pytest

from hypervisor.core import Hypervisor
from hypervisor.core.abi import L4_SLOT_LINEAR, PAGE_SHIFT, Errno, MmuextCmd, VMASST_CMD_disable, VMASST_CMD_enable, VMASST_TYPE_writable_pagetables
from hypervisor.core.abi import PFEC_page_present as PF_P
from hypervisor.core.abi import PFEC_user_mode as PF_U
from hypervisor.core.abi import PFEC_write_access as PF_W
from hypervisor.core.cpu import PageFault
from hypervisor.core.pagetable import GUEST_KERNEL, G
from hypervisor.core.trace import TraceWriter, replay, state_digest

from .conftest import fails_with
from .guest import RW, US, A, D, Guest, P, slot

USER_VA = 0x400000  # L4 0, L3 0, L2 2, L1 0: the one page new_pgd maps
LEAF = P | RW | US | A | D
# Through Xen's linear self-map (L4 slot 258, no USER) to the boot L3, L2 and first L1, all present.
LINEAR_VA = 0xFFFF000000000000 | (L4_SLOT_LINEAR << 39) | (272 << 30)


def user_space(guest, pages: dict[int, int], vcpu: int = 0, **kw) -> dict:
    """A pinned process tree mapping `pages` (va -> mfn), loaded as vCPU `vcpu`'s user base."""
    tree = guest.new_pgd(pages, **kw)
    guest.pin(4, tree["l4"])
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, tree["l4"]), vcpu=vcpu)
    return tree


def counts(hv, mfn: int) -> tuple[int, int]:
    info = hv.frame_info(mfn)
    return info["count"], info["type_count"]


def entry(hv, table: int, index: int) -> int:
    return int(hv.memory.entries(table)[index])


# -- plain accesses --------------------------------------------------------------------------


def test_sizes_are_little_endian_and_naturally_aligned(hv, guest):
    pfn, _ = guest.new_data_page(0x1122334455667788)
    va = guest.direct_va(pfn)
    assert [guest.load(va + off, size) for off, size in ((0, 1), (1, 1), (2, 2), (4, 4), (0, 8))] == [
        0x88, 0x77, 0x5566, 0x11223344, 0x1122334455667788,
    ]
    assert guest.store(va + 2, 0xABCD, size=2) is None
    assert guest.store(va + 7, 0xEE, size=1) is None
    assert guest.load(va) == 0xEE223344ABCD7788
    assert guest.access("read", va=va, length=8) == bytes.fromhex("8877cdab443322ee")
    assert guest.access("write", va=va + 4090, data=b"xensim") is None
    assert guest.access("read", va=va + 4090, length=6) == b"xensim"


@pytest.mark.parametrize(
    "call, args, match",
    [
        ("load", {"va": 0x1001, "size": 2}, "aligned"),
        ("load", {"va": 0x1000, "size": 3}, "size 3"),
        ("load", {"va": -8, "size": 8}, "aligned"),
        ("store", {"va": 0x1000, "size": 2, "value": 0x10000}, "does not fit"),
        ("atomic", {"operation": "fetch_sub", "va": 0x1000, "size": 8, "operand": 1}, "unknown atomic"),
        ("atomic", {"operation": "cmpxchg", "va": 0x1000, "size": 8, "operand": 1}, "needs expected"),
        ("atomic", {"operation": "xchg", "va": 0x1000, "size": 8, "operand": 1, "expected": 0}, "takes no"),
        ("read", {"va": 0xFFC, "length": 8}, "one page"),
        ("read", {"va": 0x1000, "length": 0}, "one page"),
        ("write", {"va": 0x1F00, "data": bytes(512)}, "one page"),
        ("load", {"va": 0x0000800000000000, "size": 8}, "not canonical"),
    ],
)
def test_bad_access_arguments_einval(hv, guest, call, args, match):
    with fails_with(hv, Errno.EINVAL, match=match):
        hv.hypercall(guest.domid, 0, call, **args)


def test_dispatch_results_have_the_proto_response_shapes(hv, guest):
    pfn, _ = guest.new_data_page(5)
    va = guest.direct_va(pfn)
    assert guest.call("load", va=va, size=8) == {"value": 5}
    assert guest.call("store", va=va, size=8, value=6) == {}
    assert guest.call("atomic", operation="fetch_add", va=va, size=8, operand=1) == {"old": 6}
    assert guest.call("read", va=va, length=1) == {"data": b"\x07"}
    assert guest.call("load", va=USER_VA, size=8) == {
        "fault": {"va": USER_VA, "error_code": 0, "detail": f"L4 entry 0 of mfn {guest.l4:#x} is not present"}
    }
    results = guest.call("multicall", calls=[{"op": "load", "args": {"va": va, "size": 1}}])
    assert results == [{"result": {"value": 7}}]


def test_memory_accesses_trace_and_replay(hv):
    """Results are plain values (bytes written stored as they are, bytes read as their
    checksum), so a replay reproduces them."""
    out = io.BytesIO()
    fresh = Hypervisor(nr_frames=hv.nr_frames)
    fresh.tracer = TraceWriter(fresh, out)
    g = Guest(fresh)
    pfn, _ = g.new_data_page(9)
    g.access("write", va=g.direct_va(pfn) + 8, data=b"\x00\xff")
    g.access("read", va=g.direct_va(pfn), length=16)
    g.load(USER_VA)
    fresh.tracer.close()
    report, _ = replay(io.BytesIO(out.getvalue()))
    assert report.ok, report.mismatches


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("va, level", [(0x8000000000, 4), (0x40000000, 3), (0x600000, 2), (0x401000, 1)])
@pytest.mark.parametrize("write", [False, True])
def test_not_present_at_each_level_faults_with_p_clear(hv, guest, va, level, write):
    _, page = guest.new_data_page(1)
    tree = user_space(guest, {USER_VA: page})
    table = tree[f"l{level}"]
    before = state_digest(hv)
    got = guest.store(va, 1, user=True) if write else guest.load(va, user=True)
    assert (got.va, got.error_code) == (va, PF_U | (PF_W if write else 0))
    assert got.detail == f"L{level} entry {slot(va, level)} of mfn {table:#x} is not present"
    assert state_digest(hv) == before


def test_write_to_read_only_user_page_faults_with_p_and_w(hv, guest):
    _, page = guest.new_data_page(1)
    tree = user_space(guest, {USER_VA: page}, user_rw=False)
    assert guest.load(USER_VA, user=True) == 1
    got = guest.store(USER_VA, 2, user=True)
    assert (got.va, got.error_code) == (USER_VA, PF_P | PF_W | PF_U)
    assert got.detail == f"L1 entry 0 of mfn {tree['l1']:#x} is read-only"
    assert guest.atomic("cmpxchg", USER_VA, 3, expected=0, user=True).error_code == PF_P | PF_W | PF_U
    assert guest.load(USER_VA, user=True) == 1


def test_kernel_write_to_read_only_data_page_is_a_plain_fault(hv, guest):
    """ptwr only takes writes to validated L1s: a read-only data page faults as usual."""
    _, page = guest.new_data_page(1)
    tree = guest.new_pgd({USER_VA: page}, user_rw=False)
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    got = guest.store(USER_VA, 2, vcpu=1)
    assert (got.error_code, got.detail) == (PF_P | PF_W, f"L1 entry 0 of mfn {tree['l1']:#x} is read-only")
    assert guest.load(USER_VA, vcpu=1) == 1


@pytest.mark.parametrize("user", [False, True])
def test_xens_linear_map_lacks_user_so_both_modes_fault(hv, guest, user):
    """The guest kernel runs in ring 3: an entry without USER stops it as well as user code."""
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, guest.l4))
    got = guest.load(LINEAR_VA, user=user)
    assert got.error_code == PF_P | (PF_U if user else 0)
    assert got.detail == f"va {LINEAR_VA:#x} is in Xen's range: L4 entry {L4_SLOT_LINEAR} of mfn {guest.l4:#x} lacks USER"
    assert guest.store(LINEAR_VA, 0).error_code == PF_P | PF_W  # not a guest address: no ptwr


def test_user_and_kernel_modes_walk_their_own_bases(hv, guest):
    pfn, page = guest.new_data_page(0xAA)
    assert guest.load(USER_VA, user=True) == PageFault(USER_VA, PF_U, "the vCPU has no user base pointer")
    user_space(guest, {USER_VA: page}, kernel=False)
    assert guest.load(USER_VA).error_code == 0  # the boot kernel table maps no user half
    assert guest.load(USER_VA, user=True) == 0xAA
    direct = guest.direct_va(pfn)
    assert guest.load(direct) == 0xAA
    assert guest.load(direct, user=True).error_code == PF_U  # the user table has no kernel half


def test_walk_sets_accessed_bits_and_write_sets_dirty(hv, guest):
    _, page = guest.new_data_page(1)
    tree = guest.new_pgd({USER_VA: page})
    for level in (3, 2, 1):  # as Linux writes fresh entries: no A, no D
        table = tree[f"l{level}"]
        guest.set_entry(table, slot(USER_VA, level), entry(hv, table, slot(USER_VA, level)) & ~(A | D))
    guest.pin(4, tree["l4"])
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, tree["l4"]))
    assert not entry(hv, tree["l1"], 0) & (A | D)
    assert guest.load(USER_VA, user=True) == 1
    for level in (4, 3, 2, 1):
        assert entry(hv, tree[f"l{level}"], slot(USER_VA, level)) & A, level
    assert not entry(hv, tree["l1"], 0) & D
    assert guest.store(USER_VA, 2, user=True) is None  # a write hit on a clean entry re-walks
    assert entry(hv, tree["l1"], 0) & D
    assert not entry(hv, tree["l2"], slot(USER_VA, 2)) & D  # D lives in the leaf only


def test_write_hit_on_entry_cached_read_only_rewalks_without_a_flush(hv, guest):
    """A permission upgrade needs no flush: the cached read-only entry is treated as a miss."""
    _, page = guest.new_data_page(1)
    tree = user_space(guest, {USER_VA: page}, user_rw=False)
    assert guest.load(USER_VA, user=True) == 1
    guest.set_entry(tree["l1"], 0, (page << PAGE_SHIFT) | LEAF)
    assert guest.store(USER_VA, 2, user=True) is None
    assert guest.load(USER_VA, user=True) == 2
    assert hv.domains[guest.domid].vcpus[0].stale_tlb_hits == 0


# -- the stale-TLB oracle -----------------------------------------------------------------------


def remap_without_flush(guest, tree, va: int, mfn: int) -> None:
    guest.set_entry(tree["l1"], slot(va, 1), (mfn << PAGE_SHIFT) | LEAF)  # an L1 update: Xen flushes nothing


def test_stale_tlb_hit_is_allowed_and_counted_until_flush_multi(hv, guest):
    _, a = guest.new_data_page(0xA)
    _, b = guest.new_data_page(0xB)
    tree = guest.new_pgd({USER_VA: a})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    vcpu1 = hv.domains[guest.domid].vcpus[1]
    assert guest.load(USER_VA, vcpu=1) == 0xA
    remap_without_flush(guest, tree, USER_VA, b)
    assert guest.load(USER_VA, vcpu=1) == 0xA  # what the hardware would do
    assert vcpu1.stale_tlb_hits == 1
    assert list(vcpu1.stale_tlb_records) == [{"va": USER_VA, "mfn": a, "current_mfn": b, "write": False, "user": False}]
    guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, guest.vcpumask(0)))  # names the wrong vCPU
    assert guest.load(USER_VA, vcpu=1) == 0xA
    assert vcpu1.stale_tlb_hits == 2
    guest.mmuext((MmuextCmd.TLB_FLUSH_MULTI, 0, guest.vcpumask(1)))
    assert guest.load(USER_VA, vcpu=1) == 0xB
    assert vcpu1.stale_tlb_hits == 2


def test_invlpg_multi_drops_only_that_page_on_the_named_vcpu(hv, guest):
    _, a = guest.new_data_page(0xA)
    _, b = guest.new_data_page(0xB)
    _, c = guest.new_data_page(0xC)
    other_va = USER_VA + 0x1000
    tree = guest.new_pgd({USER_VA: a, other_va: a})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    assert (guest.load(USER_VA, vcpu=1), guest.load(other_va, vcpu=1)) == (0xA, 0xA)
    remap_without_flush(guest, tree, USER_VA, b)
    remap_without_flush(guest, tree, other_va, c)
    guest.mmuext((MmuextCmd.INVLPG_MULTI, USER_VA, guest.vcpumask(1)))
    assert (guest.load(USER_VA, vcpu=1), guest.load(other_va, vcpu=1)) == (0xB, 0xA)
    assert hv.domains[guest.domid].vcpus[1].stale_tlb_hits == 1


def test_store_through_stale_writable_entry_lands_in_the_old_frame(hv, guest):
    """Write-protecting without a flush leaves a writable translation: the store goes through."""
    _, page = guest.new_data_page(1)
    tree = user_space(guest, {USER_VA: page})
    assert guest.store(USER_VA, 2, user=True) is None
    guest.set_entry(tree["l1"], 0, (page << PAGE_SHIFT) | P | US | A | D)
    assert guest.store(USER_VA, 3, user=True) is None
    vcpu = hv.domains[guest.domid].vcpus[0]
    assert (vcpu.stale_tlb_hits, vcpu.stale_tlb_records[-1]["current_mfn"]) == (1, None)
    assert guest.load(USER_VA, user=True) == 3


def test_strict_tlb_faults_the_stale_hit_and_the_retry_sees_the_current_tables(hv, guest):
    hv.strict_tlb = True
    _, a = guest.new_data_page(0xA)
    _, b = guest.new_data_page(0xB)
    tree = user_space(guest, {USER_VA: a})
    assert guest.load(USER_VA, user=True) == 0xA
    remap_without_flush(guest, tree, USER_VA, b)
    got = guest.load(USER_VA, user=True)
    assert (got.va, got.error_code) == (USER_VA, PF_P | PF_U)
    assert got.detail == f"stale TLB entry maps mfn {a:#x} (strict_tlb): the current tables map mfn {b:#x}"
    assert hv.domains[guest.domid].vcpus[0].stale_tlb_hits == 1
    assert guest.load(USER_VA, user=True) == 0xB


def test_non_global_entry_serves_only_the_mode_that_filled_it(hv, guest):
    _, a = guest.new_data_page(0xA)
    b_pfn, b = guest.new_data_page(0xB)
    kernel_va = guest.direct_va(b_pfn)  # a kernel page
    user_space(guest, {USER_VA: a})  # with the kernel half, so user mode can reach kernel_va
    assert guest.load(kernel_va) == 0xB
    l1, index = guest.direct_l1(b_pfn)
    assert not entry(hv, l1, index) & G and entry(hv, l1, index) & GUEST_KERNEL
    guest.set_entry(l1, index, (a << PAGE_SHIFT) | P | RW | A | D)  # no flush; still a kernel page
    assert guest.load(kernel_va, user=True) == 0xA  # a fresh walk, not the kernel's entry
    assert hv.domains[guest.domid].vcpus[0].stale_tlb_hits == 0


def test_global_entry_serves_both_modes(hv, guest):
    _, a = guest.new_data_page(0xA)
    _, b = guest.new_data_page(0xB)
    tree = user_space(guest, {USER_VA: a})
    guest.new_baseptr(tree["l4"])
    assert guest.load(USER_VA, user=True) == 0xA
    assert entry(hv, tree["l1"], 0) & G  # Xen makes user pages global (docs/xen.md section 2.5)
    remap_without_flush(guest, tree, USER_VA, b)
    assert guest.load(USER_VA) == 0xA
    assert list(hv.domains[guest.domid].vcpus[0].stale_tlb_records)[-1]["user"] is False


# -- writable pagetables (ptwr) ----------------------------------------------------------------


def l1_va(guest, tree, index: int = 0) -> int:
    """The kernel's direct-map address of entry `index` of the tree's L1 (mapped read-only)."""
    return guest.direct_va(tree["pfns"][3]) + 8 * index


def test_ptwr_store_into_read_only_l1_is_a_checked_update(hv, guest):
    _, a = guest.new_data_page(0xA)
    _, c = guest.new_data_page(0xC)
    tree = user_space(guest, {USER_VA: a})
    a_before, c_before = counts(hv, a), counts(hv, c)
    assert guest.store(l1_va(guest, tree), (c << PAGE_SHIFT) | LEAF) is None
    assert entry(hv, tree["l1"], 0) == (c << PAGE_SHIFT) | LEAF | G  # adjusted as Xen stores it
    assert counts(hv, a) == (a_before[0] - 1, a_before[1] - 1)
    assert counts(hv, c) == (c_before[0] + 1, c_before[1] + 1)
    assert guest.load(USER_VA, user=True) == 0xC
    assert guest.load(l1_va(guest, tree)) == (c << PAGE_SHIFT) | LEAF | G


def test_ptwr_needs_vmasst_writable_pagetables(hv, guest):
    """fix_page_fault (xen/arch/x86/traps.c) emulates only for a domain that enabled
    writable_pagetables (docs/xen.md section 25): without it the store's #PF stands and the
    L1 is untouched; enabled again, the same store is emulated."""
    _, a = guest.new_data_page(0xA)
    _, c = guest.new_data_page(0xC)
    tree = user_space(guest, {USER_VA: a})
    before = entry(hv, tree["l1"], 0)
    assert guest.call("vm_assist", cmd=VMASST_CMD_disable, type=VMASST_TYPE_writable_pagetables) == 0
    assert guest.store(l1_va(guest, tree), (c << PAGE_SHIFT) | LEAF).error_code == PF_P | PF_W
    assert entry(hv, tree["l1"], 0) == before
    assert guest.call("vm_assist", cmd=VMASST_CMD_enable, type=VMASST_TYPE_writable_pagetables) == 0
    assert guest.store(l1_va(guest, tree), (c << PAGE_SHIFT) | LEAF) is None
    assert guest.load(USER_VA, user=True) == 0xC


def test_ptwr_sub_word_store_is_merged_into_its_entry(hv, guest):
    """Xen turns a narrower store into a full-entry update: here the low half drops RW."""
    _, a = guest.new_data_page(0xA)
    tree = user_space(guest, {USER_VA: a})
    old = entry(hv, tree["l1"], 0)
    writable = counts(hv, a)[1]
    assert guest.store(l1_va(guest, tree), (old & ~RW) & 0xFFFFFFFF, size=4) is None
    assert entry(hv, tree["l1"], 0) == old & ~RW
    assert counts(hv, a)[1] == writable - 1


@pytest.mark.parametrize(
    "target",
    ["foreign", "pagetable_rw", "bad_flags"],
)
def test_ptwr_refused_entry_returns_the_original_fault_and_changes_nothing(hv, guest, other, target):
    _, a = guest.new_data_page(0xA)
    tree = user_space(guest, {USER_VA: a})
    new = {
        "foreign": (other.alloc()[1] << PAGE_SHIFT) | LEAF,
        "pagetable_rw": (tree["l2"] << PAGE_SHIFT) | LEAF,
        "bad_flags": (a << PAGE_SHIFT) | LEAF | 0x10,  # PCD
    }[target]
    va = l1_va(guest, tree, 3)
    direct_l1, index = guest.direct_l1(tree["pfns"][3])
    before = state_digest(hv)
    assert guest.store(va, new) == PageFault(va, PF_P | PF_W, f"L1 entry {index} of mfn {direct_l1:#x} is read-only")
    assert state_digest(hv) == before


def test_store_into_read_only_mapping_of_other_frames_is_not_emulated(hv, guest):
    _, a = guest.new_data_page(0xA)
    tree = guest.new_pgd({USER_VA: a})
    unpinned_l1 = guest.store(l1_va(guest, tree), 0)  # read-only, but not a validated L1
    guest.pin(4, tree["l4"])
    upper = guest.store(guest.direct_va(tree["pfns"][2]), 0)  # a validated L2
    assert (unpinned_l1.error_code, upper.error_code) == (PF_P | PF_W, PF_P | PF_W)
    guest.mmuext((MmuextCmd.NEW_USER_BASEPTR, guest.l4))
    in_user_mode = guest.store(l1_va(guest, tree), 0, user=True)  # only the kernel's stores
    assert in_user_mode.error_code == PF_P | PF_W | PF_U
    assert entry(hv, tree["l1"], 0) == (a << PAGE_SHIFT) | LEAF | G


def test_ptwr_cmpxchg_exchanges_only_on_match_but_checks_the_new_entry_first(hv, guest, other):
    _, a = guest.new_data_page(0xA)
    _, c = guest.new_data_page(0xC)
    tree = user_space(guest, {USER_VA: a})
    va, old = l1_va(guest, tree), entry(hv, tree["l1"], 0)
    new = (c << PAGE_SHIFT) | LEAF
    c_before = counts(hv, c)
    assert guest.atomic("cmpxchg", va, new, expected=old ^ A) == old  # mismatch: nothing stored
    assert (entry(hv, tree["l1"], 0), counts(hv, c)) == (old, c_before)
    foreign = (other.alloc()[1] << PAGE_SHIFT) | LEAF
    assert guest.atomic("cmpxchg", va, foreign, expected=old ^ A).error_code == PF_P | PF_W
    assert guest.atomic("cmpxchg", va, new, expected=old) == old
    assert entry(hv, tree["l1"], 0) == new | G
    assert counts(hv, c) == (c_before[0] + 1, c_before[1] + 1)


def test_ptwr_xchg_clears_an_entry_as_ptep_get_and_clear_does(hv, guest):
    _, a = guest.new_data_page(0xA)
    tree = user_space(guest, {USER_VA: a})
    old, a_before = entry(hv, tree["l1"], 0), counts(hv, a)
    assert guest.atomic("xchg", l1_va(guest, tree), 0) == old
    assert entry(hv, tree["l1"], 0) == 0
    assert counts(hv, a) == (a_before[0] - 1, a_before[1] - 1)


# -- atomics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_atomics_return_the_old_value_and_wrap_at_their_size(hv, guest, size):
    pfn, _ = guest.new_data_page(0)
    top = (1 << (8 * size)) - 1
    va = guest.direct_va(pfn) + size  # not at offset 0, so the neighbours must survive
    guest.store(guest.direct_va(pfn), 0x5A5A5A5A5A5A5A5A)
    guest.store(guest.direct_va(pfn) + 8, 0x5A5A5A5A5A5A5A5A)
    guest.store(va, top - 1, size=size)
    assert guest.atomic("fetch_add", va, 3, size=size) == top - 1
    assert guest.load(va, size) == 1
    assert guest.atomic("cmpxchg", va, 7, size=size, expected=2) == 1  # failed: old != expected
    assert guest.atomic("cmpxchg", va, 7, size=size, expected=1) == 1
    assert guest.atomic("xchg", va, 0x0C, size=size) == 7
    assert guest.atomic("fetch_or", va, 0x30, size=size) == 0x0C
    assert guest.atomic("fetch_and", va, 0x14, size=size) == 0x3C
    assert guest.load(va, size) == 0x14
    neighbours = guest.access("read", va=guest.direct_va(pfn), length=16)
    assert neighbours[:size] == b"\x5a" * size and neighbours[2 * size :] == b"\x5a" * (16 - 2 * size)



def test_a_fault_record_is_the_dataclass_as_a_dict():
    """The dispatch answers a fault with PageFault.record, a hand-written asdict (asdict's
    recursive copy cost 5.9 us a fault): it must keep every field the dataclass has."""
    fault = PageFault(va=0x1000, error_code=0x7, detail="L1 entry 1 of mfn 0x42 not present")
    assert fault.record() == asdict(fault)
