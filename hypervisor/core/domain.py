"""Domains and vCPUs, the domain builder, and domain destruction.

The builder plays libxl/libxenguest for a PV guest (docs/xen.md section 17; a 32-bit one:
docs/pv32.md section 4): it allocates the guest's frames, writes start-info and the P2M list
into guest memory, builds a pagetable of its paging mode's levels (paging.py) that maps all
lowmem at the direct map (the pagetable frames themselves read-only), pins the top level (an
L4, or a PAE L3) and loads it as vCPU 0's kernel base, all through the ordinary reference
primitives, so a freshly built guest audits clean. Destruction follows docs/xen.md section 12.4.
"""

from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .abi import (
    DOMID_XEN,
    ENTRIES_PER_TABLE,
    EVTCHN_2L_NR_CHANNELS,
    GUEST_ABI,
    INVALID_MFN,
    L2_SLOT_COMPAT_XEN_FIRST,
    MAX_VCPUS,
    NR_VIRQS,
    PAE_XEN_L3_SLOT,
    PAGE_OFFSET,
    PAGE_OFFSET_PAE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PERIODIC_DEFAULT_NS,
    SHARED_INFO_VCPU_INFO,
    START_INFO_FIELD_OFFSET,
    START_INFO_FIELDS,
    START_INFO_MAGIC,
    START_INFO_MAGIC_PAE,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    Errno,
    GuestAbi,
    PageType,
    Pte,
    RUNSTATE_offline,
    VGCF_in_kernel,
    VGCF_online,
)
from .errors import XenError
from .evtchn import LIBXL_MAX_EVTCHN_PORT, evtchn_init
from .evtchn_fifo import EvtchnFifo
from .frames import PAGETABLE_TYPES, PARTIAL, PINNED, VALIDATED, FrameTable
from .pagetable import XEN_SLOTS as XEN_L4_SLOTS
from .paging import MODES, PV64, PagingMode
from .preempt import Continuation
from .tlb import Tlb

MIN_PAGES = 16
# libxl's max_pages: the guest's memory plus LIBXL_MAXMEM_CONSTANT (1024 KiB) of slack
# (tools/libs/light/libxl_dom.c, libxl__build_pre; docs/xen.md section 23).
MAXMEM_SLACK_PAGES = 1024 * 1024 // PAGE_SIZE
_TABLE_FLAGS = int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY)
# libxenguest's lvl_prot[1..2] for a PAE guest's L2 and L3 entries (xg_dom_x86.c,
# alloc_pgtables_x86_32_pae): Xen adds nothing to a PV32 L2 entry, so USER is the builder's.
_PAE_TABLE_FLAGS = _TABLE_FLAGS | int(Pte.USER)
# How Xen installs a PV32 vCPU's L3 in slot 0 of its compat L4 (new_guest_cr3, arch_set_info_guest).
_COMPAT_L4_FLAGS = int(Pte.PRESENT | Pte.RW | Pte.USER | Pte.ACCESSED)
_DATA_FLAGS = int(Pte.PRESENT | Pte.ACCESSED | Pte.DIRTY)


@dataclass
class Runstate:
    """struct vcpu_runstate_info (docs/vcpu-time.md section 6): the RUNSTATE_* the vCPU is in,
    since when (Xen system time), and the ns spent in each state before that."""

    state: int = RUNSTATE_offline  # vcpu_create: every vCPU starts offline
    state_entry_time: int = 0
    time: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


@dataclass(eq=False)
class Vcpu:
    """A vCPU: base pointers (each holding a general and a type reference), state, TLB."""

    domid: int
    vcpu_id: int
    guest_table: int = 0  # kernel base (cr3) mfn; 0 = none
    guest_table_user: int = 0  # user base mfn; 0 = none
    initialised: bool = False
    down: bool = True
    tlb: Tlb = field(default_factory=Tlb)
    # The stale-TLB oracle (cpu.py): hits on translations the current pagetables no longer
    # back, and the last few of them as {"va", "mfn", "current_mfn", "write", "user"}.
    stale_tlb_hits: int = 0
    stale_tlb_records: deque = field(default_factory=lambda: deque(maxlen=16))
    # VCPUOP_initialise's context: VGCF_* flags, and where the vCPU's process starts.
    vgc_flags: int = 0
    rip: int = 0
    rsp: int = 0
    blocked: bool = False  # _VPF_blocked: asleep in SCHEDOP_block or SCHEDOP_poll
    poll_evtchn: int = 0  # SCHEDOP_poll's one port; -1 = several; 0 = not polling
    virq_to_evtchn: list[int] = field(default_factory=lambda: [0] * NR_VIRQS)  # VIRQ -> port (docs/xen.md section 16.4)
    # Xen's old_guest_table: partial tables this vCPU's call left to tear down, each with a
    # general reference (frames.py). Xen needs one slot; a VCPUOP_initialise that xensim rolls
    # back can leave two.
    old_guest_tables: list[int] = field(default_factory=list)
    # The hypercall this vCPU is in, stopped at a preemption point, until Hypervisor.resume
    # goes on with it (Xen keeps it in the vCPU's registers): part of the core's state, so
    # that a snapshot taken meanwhile replays the rest of the call.
    continuation: Continuation | None = None
    # The periodic timer (docs/vcpu-time.md section 5): its period (0 = stopped) and when it
    # last fired, Xen's periodic_period and periodic_last_event.
    periodic_period: int = PERIODIC_DEFAULT_NS
    periodic_last_event: int = 0
    runstate: Runstate = field(default_factory=Runstate)
    # VCPUOP_register_runstate_memory_area's guest virtual address (0 = none), which Xen
    # rewrites whenever the runstate changes (docs/vcpu-time.md section 6).
    runstate_guest: int = 0
    # VCPUOP_register_vcpu_info's area as (mfn, byte offset), holding a general and a writable
    # type reference on the mfn; None = vcpu_info[vcpu_id] of shared info (docs/vcpu-time.md section 7).
    vcpu_info_area: tuple[int, int] | None = None
    # A PV32 vCPU's compat L4 (setup_compat_l4, xen/arch/x86/pv/domain.c): a Xen frame whose
    # slot 0 holds `guest_table`, the guest's PAE L3 (docs/pv32.md section 2); 0 for PV64.
    compat_l4: int = 0
    mode: PagingMode = PV64  # its domain's (paging.py), kept here for the memory path


    def base(self, user: bool = False) -> int:
        """The table the CPU walks from in kernel or user mode: the 64-bit kernel or user
        base, or PV32's one L3 (its kernel and user share an address space)."""
        return self.guest_table_user if user and not self.compat_l4 else self.guest_table

    def info(self) -> dict:
        return {
            "vcpu": self.vcpu_id,
            "initialised": self.initialised,
            "online": not self.down,
            "cr3": self.guest_table,
            "user_cr3": self.guest_table_user,
            "tlb_entries": len(self.tlb),
            "blocked": self.blocked,
            "stale_tlb_hits": self.stale_tlb_hits,
        }


@dataclass(eq=False)
class Domain:
    domid: int
    # Which domain this is, for good: domids are reused once the counter wraps, instances
    # never (Hypervisor.create_domain numbers them), so whatever names a domain from outside
    # the core (a token) names its instance.
    instance: int
    name: str
    nr_pages: int
    nr_lowmem_pages: int
    # pfn -> mfn, as the builder assigned them; INVALID_MFN where the guest gave the frame back,
    # a frame populate_physmap gave for a pfn without one (memop.py). Xen keeps no P2M for a PV
    # guest: this is the audit's reference, the guest's own P2M is in its memory.
    p2m: np.ndarray
    vcpus: list[Vcpu]
    shared_info_mfn: int = 0
    start_info: dict = field(default_factory=dict)
    privileged: bool = False
    paused: bool = False
    # mfns whose M2P entry the guest rewrote itself (MMU_MACHPHYS_UPDATE): audit does not
    # expect the builder's pfn there.
    guest_m2p: set[int] = field(default_factory=set)
    max_evtchn_port: int = LIBXL_MAX_EVTCHN_PORT
    evtchn: list = field(default_factory=list)  # the port table (evtchn.Evtchn), whole buckets
    poll_mask: set[int] = field(default_factory=set)  # ids of the vCPUs in SCHEDOP_poll
    evtchn_fifo: EvtchnFifo | None = None  # the FIFO ABI's state once EVTCHNOP_init_control ran; None: 2-level
    shutdown_code: int | None = None  # SHUTDOWN_*, once the domain has shut down
    # 64, or 32 for a PAE guest on the compat ABI: XEN_DOMCTL_set_address_size before the
    # build, fixed for life (docs/pv32.md section 1).
    address_size: int = 64
    vm_assist: int = 0  # VMASST_TYPE_* bits enabled (d->vm_assist); none: no guest enables one yet
    max_pages: int = 0  # d->max_pages: the reservation memory_op may grow to (docs/xen.md section 23)
    # Its hypercalls by (op, outcome), as Hypervisor.stats counts the machine's: kept with the
    # domain (and gone with it), so a replayed trace counts them too (views.domain_stats).
    stats: Counter = field(default_factory=Counter)

    @property
    def abi(self) -> GuestAbi:
        """The wire layout of its address size (docs/pv32.md section 6)."""
        return GUEST_ABI[self.address_size]

    def info(self) -> dict:
        return {
            "domid": self.domid,
            "instance": self.instance,
            "name": self.name,
            "nr_pages": self.nr_pages,
            "nr_vcpus": len(self.vcpus),
            "online_vcpus": sum(not v.down for v in self.vcpus),
            "paused": self.paused,
            "max_evtchn_port": self.max_evtchn_port,
            "shutdown_code": self.shutdown_code,
            "address_size": self.address_size,
        }

    @property
    def mode(self) -> PagingMode:
        return MODES[self.address_size]


def _layout(nr_pages: int, nr_lowmem: int, mode: PagingMode) -> dict:
    """Where the boot structures go in pfn space: start-info, the P2M list (u64 mfns, or a
    PV32 guest's u32 ones: p2m_guest in xg_dom_x86.c), the pagetable: the top level, then for
    PV64 one L3 (it covers 512 GiB), the L2s and the L1s (a PV32 guest's lowmem fits under
    slot 3 of its L3, below Xen's hole, so one L2)."""
    p2m_frames = -(-nr_pages * (4 if mode.pv32 else 8) // PAGE_SIZE)
    nr_l1 = -(-nr_lowmem // ENTRIES_PER_TABLE)
    nr_l2 = -(-nr_l1 // ENTRIES_PER_TABLE)
    pt_base_pfn = 1 + p2m_frames
    nr_pt = (1 if mode.pv32 else 2) + nr_l2 + nr_l1
    return {
        "p2m_pfn": 1,
        "pt_base_pfn": pt_base_pfn,
        "nr_l2": nr_l2,
        "nr_l1": nr_l1,
        "nr_pt_frames": nr_pt,
        "first_free_pfn": pt_base_pfn + nr_pt,
    }


def build(
    frames: FrameTable,
    m2p: np.ndarray,
    domid: int,
    instance: int,
    name: str,
    nr_pages: int,
    nr_vcpus: int,
    highmem_pages: int,
    max_evtchn_port: int = LIBXL_MAX_EVTCHN_PORT,
    address_size: int = 64,
    xen_l4_entries=None,
) -> Domain:
    """Create a domain the way the toolstack's domain builder does (docs/xen.md section 17;
    PV32: docs/pv32.md section 4). `xen_l4_entries(mfn)` gives Xen's slots of an L4 (a PV32
    vCPU's compat L4)."""
    if address_size not in MODES:  # arch_do_domctl, XEN_DOMCTL_set_address_size
        raise XenError(Errno.EINVAL, f"address_size {address_size} is neither 64 (x86-64 PV) nor 32 (PAE on the compat ABI)")
    mode = MODES[address_size]
    if not 0 <= max_evtchn_port < EVTCHN_2L_NR_CHANNELS:
        raise XenError(Errno.EINVAL, f"max_evtchn_port {max_evtchn_port} is outside 0..{EVTCHN_2L_NR_CHANNELS - 1} (2-level ABI)")
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise XenError(Errno.EINVAL, f"nr_vcpus {nr_vcpus} is outside 1..{MAX_VCPUS}")
    nr_lowmem = nr_pages - highmem_pages
    if nr_pages < MIN_PAGES or highmem_pages < 0:
        raise XenError(Errno.EINVAL, f"nr_pages {nr_pages} (highmem {highmem_pages}) is below {MIN_PAGES} or negative")
    layout = _layout(nr_pages, nr_lowmem, mode)
    if layout["first_free_pfn"] + 8 > nr_lowmem:
        raise XenError(Errno.EINVAL, f"{nr_lowmem} lowmem pages cannot hold the boot layout ({layout['first_free_pfn']} pages)")
    if mode.pv32 and layout["nr_l1"] > L2_SLOT_COMPAT_XEN_FIRST:
        raise XenError(Errno.EINVAL, f"{nr_lowmem} lowmem pages do not fit between {PAGE_OFFSET_PAE:#x} and Xen's hole (at most {L2_SLOT_COMPAT_XEN_FIRST * ENTRIES_PER_TABLE})")
    compat_l4s = nr_vcpus if mode.pv32 else 0  # setup_compat_l4: one per vCPU
    if frames.free_frames() < nr_pages + 1 + compat_l4s:
        raise XenError(Errno.ENOMEM, f"{nr_pages + 1 + compat_l4s} frames wanted, {frames.free_frames()} free")
    frames.pv32[domid] = mode.pv32  # switch_compat, before anything of the domain is validated
    mfns = frames.alloc(domid, nr_pages)[::-1].copy()  # pfn != mfn, so translation matters
    m2p[mfns] = np.arange(nr_pages, dtype=np.uint64)
    # A Xen-heap page shared with the guest: permanently writable (share_xen_page_with_guest).
    shared_info = int(frames.alloc(domid, 1, xen_heap=True)[0])
    frames.get_page_type(shared_info, PageType.WRITABLE)
    vcpus = [Vcpu(domid, i) for i in range(nr_vcpus)]
    for vcpu, l4 in zip(vcpus, frames.alloc(DOMID_XEN, compat_l4s, xen_heap=True).tolist() if compat_l4s else []):
        vcpu.compat_l4, vcpu.mode = l4, mode  # init_xen_l4_slots: Xen's slots, the guest's slot 0 empty until a base
        frames.memory.frame(l4)[XEN_L4_SLOTS] = xen_l4_entries(l4)
    domain = Domain(domid, instance, name, nr_pages, nr_lowmem, mfns, vcpus, shared_info, max_evtchn_port=max_evtchn_port, address_size=address_size)
    domain.max_pages = nr_pages + MAXMEM_SLACK_PAGES  # libxl's setmaxmem
    evtchn_init(domain)
    for vcpu in range(nr_vcpus):  # libxenguest's shared_info_x86_64: no events until the guest enables them
        frames.memory.write(shared_info, SHARED_INFO_VCPU_INFO + VCPU_INFO_SIZE * vcpu + VCPU_INFO_UPCALL_MASK, b"\x01")

    memory = frames.memory
    _write_words(memory, mfns, layout["p2m_pfn"], mfns.astype(np.uint32 if mode.pv32 else np.uint64))
    pt = layout["pt_base_pfn"]
    l2_pfn = pt + (1 if mode.pv32 else 2)
    l1_pfn = l2_pfn + layout["nr_l2"]
    direct = (mfns[:nr_lowmem].astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(_DATA_FLAGS | Pte.RW)
    direct[pt : pt + layout["nr_pt_frames"]] &= ~np.uint64(Pte.RW)  # bootstrap tables are RO
    _write_words(memory, mfns, l1_pfn, direct)
    if mode.pv32:  # the L3 maps PAGE_OFFSET_PAE in slot 3, whose L2 becomes Xen's PAE_XEN_L2
        page_offset, flags = PAGE_OFFSET_PAE, _PAE_TABLE_FLAGS
        _write_words(memory, mfns, l2_pfn, _table_entries(mfns, l1_pfn, layout["nr_l1"], flags))
        memory.frame(int(mfns[pt]))[PAE_XEN_L3_SLOT] = (int(mfns[l2_pfn]) << PAGE_SHIFT) | flags
    else:
        page_offset, l3_pfn = PAGE_OFFSET, pt + 1
        _write_words(memory, mfns, l2_pfn, _table_entries(mfns, l1_pfn, layout["nr_l1"]))
        _write_words(memory, mfns, l3_pfn, _table_entries(mfns, l2_pfn, layout["nr_l2"]))
        memory.frame(int(mfns[pt]))[(PAGE_OFFSET >> 39) & 511] = (int(mfns[l3_pfn]) << PAGE_SHIFT) | _TABLE_FLAGS

    top = int(mfns[pt])
    # The L1s first, all at once (a 4 GiB guest has 2048): the L2s' entries then find them
    # validated and take their references as usual, and the builder drops its own.
    l1s = mfns[l1_pfn : l1_pfn + layout["nr_l1"]]
    frames.get_l1_types_bulk(l1s, domid)
    frames.get_page_and_type(top, domid, mode.root_type)  # the toolstack's PIN_L4_TABLE, or PIN_L3_TABLE
    for l1 in l1s.tolist():
        frames.put_page_type(l1)
    frames.set_pinned(top, True)
    frames.get_page_and_type(top, domid, mode.root_type)  # vCPU 0's kernel base
    boot = domain.vcpus[0]
    boot.guest_table, boot.initialised, boot.down = top, True, False
    install_compat_base(memory, boot)
    boot.vgc_flags = VGCF_in_kernel | VGCF_online  # libxenguest's context for vCPU 0

    domain.start_info = {
        "nr_pages": nr_pages,
        "shared_info": shared_info << PAGE_SHIFT,
        "flags": 0,
        "pt_base": page_offset + (pt << PAGE_SHIFT),
        "nr_pt_frames": layout["nr_pt_frames"],
        "mfn_list": page_offset + (layout["p2m_pfn"] << PAGE_SHIFT),
        "first_free_pfn": layout["first_free_pfn"],
        "nr_vcpus": nr_vcpus,
        "nr_lowmem_pages": nr_lowmem,
        "pt_base_mfn": top,
    }
    magic = START_INFO_MAGIC_PAE if mode.pv32 else START_INFO_MAGIC
    record = magic.ljust(START_INFO_FIELD_OFFSET, b"\0") + b"".join(
        domain.start_info[name].to_bytes(8, "little") for name in START_INFO_FIELDS
    )
    memory.write(int(mfns[0]), 0, record)
    return domain


def install_compat_base(memory, vcpu: Vcpu) -> None:
    """Write a PV32 vCPU's base, its PAE L3, into slot 0 of its compat L4, as new_guest_cr3 and
    arch_set_info_guest do (empty when it has none). The reference is the base pointer's
    (docs/pv32.md section 2); nothing for a 64-bit vCPU."""
    if vcpu.compat_l4:
        memory.frame(vcpu.compat_l4)[0] = (vcpu.guest_table << PAGE_SHIFT) | _COMPAT_L4_FLAGS if vcpu.guest_table else 0


def _table_entries(mfns: np.ndarray, first_pfn: int, n: int, flags: int = _TABLE_FLAGS) -> np.ndarray:
    return (mfns[first_pfn : first_pfn + n].astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(flags)


def _write_words(memory, mfns: np.ndarray, first_pfn: int, words: np.ndarray) -> None:
    """Write a run of words (u64, or a PV32 P2M's u32) into consecutive guest pfns starting at
    `first_pfn`."""
    per_page = PAGE_SIZE // words.itemsize
    for i in range(0, len(words), per_page):
        chunk = words[i : i + per_page]
        memory.frame(int(mfns[first_pfn + i // per_page])).view(words.dtype)[: len(chunk)] = chunk


@contextmanager
def teardown_step(problems: list[str], what: str) -> Iterator[None]:
    """One step of a dying domain's teardown. A broken invariant (SimulatorBug, or any other
    exception: teardown never fails for a reason of the guest's) ends this step only, and is
    added to `problems`: the domain is already dead to its callers, so teardown must finish."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every exception here is a bug, reported through `problems`
        problems.append(f"{what}: {type(e).__name__}: {e}")


def owned_frames(frames: FrameTable, domain: Domain, nr_owned: int | None = None) -> np.ndarray:
    """The frames `domain` owns, in mfn order (Xen's d->page_list and d->xenpage_list,
    docs/xen.md section 21): its P2M's and its shared info, which are all of them unless
    memory_op changed its frames (docs/xen.md section 23: a frame given back but still held, an
    extent taken outside the P2M). Checked against how many it owns, `nr_owned` (by default
    the frame table's counts, which audit checks), so that a frame the P2M does not name
    (after memory_op, or a bug, which audit reports) is still found, by a scan of the whole
    frame table."""
    if nr_owned is None:
        nr_owned = frames.tot_pages.item(domain.domid) + frames.xenheap_pages.item(domain.domid)
    mine = np.sort(np.append(domain.p2m[domain.p2m != INVALID_MFN], domain.shared_info_mfn))
    mine = mine[(frames.owner[mine] == domain.domid) & np.append(True, mine[1:] != mine[:-1])]  # once each, should the P2M repeat one
    return mine if len(mine) == nr_owned else np.flatnonzero(frames.owner == domain.domid)


def relinquish(frames: FrameTable, pagetables, domain: Domain, owned: np.ndarray) -> list[str]:
    """Release everything a dying domain holds (xen/arch/x86/domain.c:domain_relinquish_resources).

    Order as in docs/xen.md section 12.4: vCPU base pointers, registered vcpu_info areas and the tables the
    vCPUs were tearing down (put_old_guest_table), Xen-heap pages, then pins, then the work of partial tables (which
    Xen's relinquish_memory finishes for PGT_partial pages), then forced devalidation of
    validated tables top-down (which breaks linear-pagetable cycles), then every allocation
    reference. Xen forces L4s, L3s and L2s only, since in a sound model the L1s lose their last
    type reference with the L2s above them; forcing L1s too changes nothing then, and when a
    bug left an L1 with a type reference nobody holds, it keeps that L1 alone from being freed
    instead of every frame the L1 maps. Runs in one go: the toolstack's destruction is not
    preemptible in xensim.

    `owned` are the domain's frames (`owned_frames`). Returns what went wrong (see
    `teardown_step`): nothing, in a sound model. Frames still
    referenced afterwards stay allocated to the domain for the caller to quarantine.
    """
    problems: list[str] = []
    for vcpu in domain.vcpus:
        for base in (vcpu.guest_table, vcpu.guest_table_user):
            if base:
                with teardown_step(problems, f"vCPU {vcpu.vcpu_id} base pointer mfn {base:#x}"):
                    frames.put_page_and_type(base)
        vcpu.guest_table = vcpu.guest_table_user = 0
        install_compat_base(frames.memory, vcpu)
        if vcpu.vcpu_info_area is not None:  # unmap_guest_area (docs/vcpu-time.md section 7)
            with teardown_step(problems, f"vCPU {vcpu.vcpu_id} vcpu_info mfn {vcpu.vcpu_info_area[0]:#x}"):
                frames.put_page_and_type(vcpu.vcpu_info_area[0])
            vcpu.vcpu_info_area = None
        with teardown_step(problems, f"vCPU {vcpu.vcpu_id} old_guest_tables {vcpu.old_guest_tables}"):
            frames.put_old_guest_tables(vcpu)
        vcpu.tlb.flush()
    with teardown_step(problems, f"shared-info mfn {domain.shared_info_mfn:#x}"):
        frames.put_page_type(domain.shared_info_mfn)
    for mfn in owned[(frames.flags[owned] & PINNED) != 0].tolist():
        frames.set_pinned(mfn, False)
        with teardown_step(problems, f"pin of mfn {mfn:#x}"):
            frames.put_page_and_type(mfn)
    for mfn in owned[(frames.flags[owned] & PARTIAL) != 0].tolist():
        with teardown_step(problems, f"partial work of mfn {mfn:#x}"):
            frames.put_page_type(mfn, partial_set=True)  # drops the partial state's own references too
    for kind in reversed(PAGETABLE_TYPES):
        live = owned[(frames.type[owned] == kind) & ((frames.flags[owned] & VALIDATED) != 0)]
        for mfn in live.tolist():
            if frames.flags.item(mfn) & VALIDATED:
                frames.flags[mfn] &= ~np.uint8(VALIDATED)
                frames.stop_at(mfn, ENTRIES_PER_TABLE, False)
                with teardown_step(problems, f"forced devalidation of {kind.name} mfn {mfn:#x}"):
                    pagetables.demote(mfn, kind)
    with teardown_step(problems, "release of the allocation references"):
        frames.release(owned)
    compat_l4s = [vcpu.compat_l4 for vcpu in domain.vcpus if vcpu.compat_l4]
    with teardown_step(problems, f"release of the compat L4s {compat_l4s}"):  # release_compat_l4
        frames.release(np.array(compat_l4s, dtype=np.int64))
    return problems
