"""The numbers of Xen's public ABI (xen/include/public) that the model and the wire share.

Every constant lives here once, named as Xen names it; reference: docs/xen.md section 0
and the section cited beside each group. The proto's enums mirror these (a test checks).
"""

from dataclasses import dataclass
from enum import IntEnum


class Errno(IntEnum):
    """xen/include/public/errno.h; hypercalls return these negated."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    ENXIO = 6
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28
    ERANGE = 34
    ENOSYS = 38
    EILSEQ = 84
    EOPNOTSUPP = 95


# Domain ids (docs/xen.md section 0.3).
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_FIRST_RESERVED = DOMID_SELF

# Paging geometry: x86-64, 4 levels of 512 eight-byte entries.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512
PADDR_BITS = 52
PTE_MFN_MASK = ((1 << PADDR_BITS) - 1) & ~(PAGE_SIZE - 1)  # pte bits 12..51
INVALID_MFN = (1 << (PADDR_BITS - PAGE_SHIFT)) - 1  # the all-ones frame number
INVALID_M2P = (1 << 64) - 1  # INVALID_M2P_ENTRY: the M2P entry of a frame no guest owns


class Pte(IntEnum):
    """PTE flag bits in pte-bit terms (docs/xen.md section 0.4)."""

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PSE = 1 << 7  # PAT in an L1
    GLOBAL = 1 << 8
    AVAIL = 0x7 << 9
    GUEST_KERNEL = 1 << 52  # Xen's marker for a 64-bit PV guest-kernel page (docs/xen.md section 2.5)
    AVAIL_HIGH = 0x7FF << 52  # pte bits 52..62
    NX = 1 << 63


class PageType(IntEnum):
    """A frame's type: the top three bits of Xen's type_info, shifted down (docs/xen.md section 1.1)."""

    NONE = 0
    L1 = 1
    L2 = 2
    L3 = 3
    L4 = 4
    SEG_DESC = 5
    SHARED = 6
    WRITABLE = 7


# Xen's reserved L4 slots for a 64-bit PV guest (docs/xen.md section 9.1), and those of them where Xen
# maps something of its own in every guest L4 (xen/arch/x86/include/asm/config.h; written by
# xen/arch/x86/mm.c init_xen_l4_slots).
HYPERVISOR_L4_FIRST = 256
HYPERVISOR_L4_LAST = 271
HYPERVISOR_VIRT_START = 0xFFFF800000000000
HYPERVISOR_VIRT_END = 0xFFFF880000000000
L4_SLOT_RO_MPT = 256  # RO_MPT_VIRT_START: the read-only M2P, readable by the guest (docs/xen.md section 22)
L4_SLOT_LINEAR = 258  # LINEAR_PT_VIRT_START: Xen's own self-map of every L4
L4_SLOT_PERDOMAIN = 260  # PERDOMAIN_VIRT_START: per-domain mappings (GDT/LDT shadows, mapcache)
L4_SLOT_XEN = 261  # XEN_VIRT_START's slot: M2P, vmap, Xen's text and data, frame table
L4_SLOT_DIRECTMAP = 262  # DIRECTMAP_VIRT_START: the direct map of RAM, slots 262..271 for PV
RO_MPT_VIRT_START = HYPERVISOR_VIRT_START  # machine_to_phys_mapping: one u64 pfn per mfn

# A 32-bit PAE guest on the compat ABI (docs/pv32.md sections 2 and 3). Its PAE L3 holds four
# entries (the rest are zeroed); the L2 under slot 3 is Xen's PGT_pae_xen_l2, whose slots from
# HYPERVISOR_COMPAT_VIRT_START's up are Xen's (xen/arch/x86/include/asm/config.h): the compat
# M2P, one u32 pfn per mfn from HYPERVISOR_COMPAT_VIRT_START, readable by the guest kernel
# (ring 1), below MACH2PHYS_COMPAT_VIRT_END. The L3 flag mask is l3_disallow_mask's for a
# PV32 domain (xen/arch/x86/mm.c): all but P, RW, US, A, D and AVAIL, in pte-bit terms.
HYPERVISOR_COMPAT_VIRT_START = 0xF5800000  # __HYPERVISOR_COMPAT_VIRT_START, a domU's hv_compat_vstart
MACH2PHYS_COMPAT_VIRT_END = 0xFFE00000
PAE_L3_SLOTS = 4
PAE_XEN_L3_SLOT = 3  # the slot whose L2 carries Xen's mappings
L2_SLOT_COMPAT_XEN_FIRST = (HYPERVISOR_COMPAT_VIRT_START >> 21) & 511  # COMPAT_L2_PAGETABLE_FIRST_XEN_SLOT: 428
PAE_L3_DISALLOW = 0x198 | (0xFFF << 52)  # 0xFFFFF198 as l3e flags: PWT, PCD, PSE, G, bits 52..63
PAE_L3_MAX_MFN = 1 << 20  # a PAE L3 at or above 4 GiB needs VMASST pae_extended_cr3

# HYPERVISOR_vm_assist (docs/xen.md section 25; xen/include/public/xen.h): its commands, the
# assists, and which of them a PV domain of each address size may turn on
# (PV32_VM_ASSIST_MASK / PV64_VM_ASSIST_MASK, xen/arch/x86/include/asm/domain.h).
VMASST_CMD_enable = 0
VMASST_CMD_disable = 1
VMASST_TYPE_4gb_segments = 0
VMASST_TYPE_4gb_segments_notify = 1
VMASST_TYPE_writable_pagetables = 2
VMASST_TYPE_pae_extended_cr3 = 3
VMASST_TYPE_architectural_iopl = 4
VMASST_TYPE_runstate_update_flag = 5
VMASST_TYPE_m2p_strict = 32
VMASST_TYPE_NAMES = {value: name.removeprefix("VMASST_TYPE_") for name, value in dict(globals()).items() if name.startswith("VMASST_TYPE_")}
PV32_VM_ASSIST_MASK = sum(1 << t for t in (VMASST_TYPE_4gb_segments, VMASST_TYPE_4gb_segments_notify, VMASST_TYPE_writable_pagetables,
                                           VMASST_TYPE_pae_extended_cr3, VMASST_TYPE_architectural_iopl, VMASST_TYPE_runstate_update_flag))
PV64_VM_ASSIST_MASK = PV32_VM_ASSIST_MASK | 1 << VMASST_TYPE_m2p_strict
VM_ASSIST_VALID = {32: PV32_VM_ASSIST_MASK, 64: PV64_VM_ASSIST_MASK}  # arch_vm_assist_valid_mask by address size


class MmuCmd(IntEnum):
    """mmu_update request commands: ptr & 7 (docs/xen.md section 4.2)."""

    NORMAL_PT_UPDATE = 0
    MACHPHYS_UPDATE = 1
    PT_UPDATE_PRESERVE_AD = 2
    PT_UPDATE_NO_TRANSLATE = 3


class MmuextCmd(IntEnum):
    """mmuext_op commands (docs/xen.md section 5.1)."""

    PIN_L1_TABLE = 0
    PIN_L2_TABLE = 1
    PIN_L3_TABLE = 2
    PIN_L4_TABLE = 3
    UNPIN_TABLE = 4
    NEW_BASEPTR = 5
    TLB_FLUSH_LOCAL = 6
    INVLPG_LOCAL = 7
    TLB_FLUSH_MULTI = 8
    INVLPG_MULTI = 9
    TLB_FLUSH_ALL = 10
    INVLPG_ALL = 11
    FLUSH_CACHE = 12
    SET_LDT = 13
    NEW_USER_BASEPTR = 15
    CLEAR_PAGE = 16
    COPY_PAGE = 17
    FLUSH_CACHE_GLOBAL = 18
    MARK_SUPER = 19
    UNMARK_SUPER = 20


# update_va_mapping flags (docs/xen.md section 6): the low two bits pick the flush, the rest its scope.
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_LOCAL = 0
UVMF_ALL = 4

# Size limits of batched calls (not Xen's: Xen takes any count). Batches are preempted like
# any long work (below), so this bounds a call's memory, not its time.
MAX_BATCH = 4096

# Hypercall preemption (Xen's hypercall_preempt_check, see preempt.py): a call does about this
# much work, then stops at a clean point and is continued after other calls have run. Work is
# counted, not timed, so that a replay stops at the same points. The unit is what numpy spends
# checking one pagetable entry (about 0.09 us): an L1 validated or devalidated counts
# ENTRIES_PER_TABLE, and a step of Python (a batch entry, an entry of an L2..L4 validated or
# devalidated, a call) STEP_WORK (about 3 us). PREEMPT_WORK is 16 L1s or 256 steps, about a
# millisecond on an idle machine, so that a call waiting behind a long one (its round trip
# takes a few turns of the server's loop) still answers within milliseconds.
PREEMPT_WORK = 1 << 13
STEP_WORK = 32

# The start-info page (docs/xen.md section 17), in xensim's layout: the magic, then these fields as
# little-endian u64 in this order. The first six are Xen's; the rest are xensim's, so that a
# guest need not guess its own layout.
START_INFO_MAGIC = b"xen-3.0-x86_64"
START_INFO_FIELDS = (
    "nr_pages",  # pages of guest pseudo-physical memory
    "shared_info",  # machine address of the shared-info frame
    "flags",
    "pt_base",  # virtual address of the initial L4 (pinned, loaded on vCPU 0)
    "nr_pt_frames",  # frames of the initial pagetable, pfns from the L4's on
    "mfn_list",  # virtual address of the P2M list: one u64 mfn per pfn
    "first_free_pfn",  # pfns below this are used by the boot layout
    "nr_vcpus",
    "nr_lowmem_pages",  # pfns below this are in the kernel's direct map; the rest is highmem
    "pt_base_mfn",
)
START_INFO_FIELD_OFFSET = 32
PAGE_OFFSET = 0xFFFF880000000000  # 64-bit Linux's direct map, L4 slot 272
START_INFO_MAGIC_PAE = b"xen-3.0-x86_32p"  # a PV32 guest's start-info magic (Xen's guest type)
PAGE_OFFSET_PAE = 0xC0000000  # 32-bit Linux's direct map: PAE L3 slot 3
MAX_VCPUS = 32  # vcpu_info areas in the shared-info frame (XEN_LEGACY_MAX_VCPUS)

# Event channel operations (public/event_channel.h; docs/xen.md section 16.3).
EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13

# EVTCHNOP_status states (docs/xen.md section 16.1).
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

# Ports of the 2-level ABI for a 64-bit guest: 64 words of 64 bits (docs/xen.md section 16.2).
BITS_PER_EVTCHN_WORD = 64
EVTCHN_2L_NR_CHANNELS = BITS_PER_EVTCHN_WORD * BITS_PER_EVTCHN_WORD

# The FIFO ABI (public/event_channel.h; docs/xen.md section 24): a u32 event word per port in
# guest event-array pages, and per vCPU a control block of a ready bitmap and 16 queue heads.
EVTCHN_FIFO_PRIORITY_MAX = 0  # the highest
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15  # the lowest
EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1
EVTCHN_FIFO_PENDING = 31  # event-word bits
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS
EVTCHN_FIFO_CONTROL_READY = 0  # struct evtchn_fifo_control_block: u32 ready, u32 _rsvd,
EVTCHN_FIFO_CONTROL_HEAD = 8  # u32 head[EVTCHN_FIFO_MAX_QUEUES]
EVTCHN_FIFO_CONTROL_SIZE = EVTCHN_FIFO_CONTROL_HEAD + 4 * EVTCHN_FIFO_MAX_QUEUES

# struct shared_info for x86_64 (public/xen.h, arch-x86/xen.h; docs/xen.md section 16.5): byte offsets.
SHARED_INFO_VCPU_INFO = 0  # vcpu_info[MAX_VCPUS], VCPU_INFO_SIZE bytes each
VCPU_INFO_SIZE = 64
VCPU_INFO_UPCALL_PENDING = 0  # u8 evtchn_upcall_pending, within a vcpu_info
VCPU_INFO_UPCALL_MASK = 1  # u8 evtchn_upcall_mask
VCPU_INFO_PENDING_SEL = 8  # u64 evtchn_pending_sel: bit w = word w of evtchn_pending has news
SHARED_INFO_EVTCHN_PENDING = 2048  # u64 evtchn_pending[64]: port p is bit p % 64 of word p / 64
SHARED_INFO_EVTCHN_MASK = 2560  # u64 evtchn_mask[64], laid out likewise

# Virtual IRQs (xen.h; docs/xen.md section 16.4). Per-vCPU: TIMER, DEBUG, XENOPROF, XENPMU.
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_TBUF = 4
VIRQ_DEBUGGER = 6
VIRQ_XENOPROF = 7
VIRQ_CON_RING = 8
VIRQ_PCPU_STATE = 9
VIRQ_MEM_EVENT = 10
VIRQ_ARGO = 11
VIRQ_ENOMEM = 12
VIRQ_XENPMU = 13
VIRQ_ARCH_0 = 16
NR_VIRQS = 24

# memory_op commands and flags (public/memory.h; docs/xen.md section 23).
XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_populate_physmap = 6
XENMEM_exchange = 11
XENMEMF_populate_on_demand = 1 << 16

# vcpu_op commands (public/vcpu.h; docs/xen.md section 14) and vcpu_guest_context flags (arch-x86/xen.h).
VCPUOP_initialise = 0
VCPUOP_up = 1
VCPUOP_down = 2
VCPUOP_is_up = 3
VCPUOP_get_runstate_info = 4
VCPUOP_register_runstate_memory_area = 5
VCPUOP_set_periodic_timer = 6
VCPUOP_stop_periodic_timer = 7
VCPUOP_set_singleshot_timer = 8
VCPUOP_stop_singleshot_timer = 9
VCPUOP_register_vcpu_info = 10
VCPU_SSHOTTMR_future = 1 << 0  # Xen ignores it since 4.18 (a late deadline fires, never -ETIME)
VGCF_in_kernel = 1 << 2
VGCF_online = 1 << 5

# sched_op commands and shutdown reasons (public/sched.h; docs/xen.md section 15).
SCHEDOP_yield = 0
SCHEDOP_block = 1
SCHEDOP_shutdown = 2
SCHEDOP_poll = 3
SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5

# x86 page-fault error code bits, as Xen names them (PFEC_*). These data accesses never set
# PFEC_reserved_bit (8: Xen's disallow masks keep reserved bits out of validated tables) or
# PFEC_insn_fetch (16).
PFEC_page_present = 1
PFEC_write_access = 2
PFEC_user_mode = 4

# Xen system time in ns (xen/include/xen/time.h): MILLISECS, and STIME_DELTA_MAX, the longest
# period a timer takes (the largest s_time_t with two bits to spare).
MILLISECS = 1_000_000
STIME_DELTA_MAX = ((1 << 64) - 1) >> 2

# The periodic timer (docs/vcpu-time.md section 5): every PV vCPU starts with a 10 ms period
# (xen/arch/x86/pv/domain.c, pv_vcpu_initialise); VCPUOP_set_periodic_timer takes 1 ms to
# STIME_DELTA_MAX (xen/common/domain.c, common_vcpu_op).
PERIODIC_DEFAULT_NS = 10 * MILLISECS
PERIODIC_MIN_NS = 1 * MILLISECS

# struct vcpu_runstate_info (public/vcpu.h; docs/vcpu-time.md section 6): int state (padded to
# 8 bytes), u64 state_entry_time, u64 time[4] indexed by state; 48 bytes in all.
RUNSTATE_running = 0
RUNSTATE_runnable = 1
RUNSTATE_blocked = 2
RUNSTATE_offline = 3
RUNSTATE_INFO_SIZE = 48


# The compat ABI: what a 32-bit PAE guest on a 64-bit Xen sees differently on the wire
# (docs/pv32.md section 6). Its xen_ulong_t, unsigned long and xen_pfn_t are 32 bits, so its
# shared_info holds 32 words of 32 event bits (evtchn_mask follows 128 bytes of evtchn_pending),
# its vcpu_info's evtchn_pending_sel is a u32 at byte 4, and its vcpu_runstate_info packs the u64s
# at 4-byte alignment (44 bytes). Its pointers are 32 bits, and a guest handle must end below
# HYPERVISOR_COMPAT_VIRT_START (compat_access_ok, xen/arch/x86/include/asm/x86_64/uaccess.h).
COMPAT_SHARED_INFO_EVTCHN_MASK = SHARED_INFO_EVTCHN_PENDING + 32 * 4
COMPAT_VCPU_INFO_PENDING_SEL = 4
COMPAT_RUNSTATE_INFO_SIZE = 44


@dataclass(frozen=True)
class GuestAbi:
    """One row per address size: the sizes and offsets the wire has for a guest of that size
    (docs/pv32.md section 6). Code that reads or writes a guest's shared structures, words
    or pointers takes them from its domain's row (Domain.abi), not from a second code path."""

    address_size: int  # 64, or 32 on the compat ABI
    word_bytes: int  # xen_ulong_t: an event-channel word, a vcpumask word, a xen_pfn_t
    shared_info_evtchn_mask: int  # byte offset of evtchn_mask (evtchn_pending is at SHARED_INFO_EVTCHN_PENDING in both)
    vcpu_info_pending_sel: int  # byte offset of evtchn_pending_sel, word_bytes wide
    runstate_info_size: int  # struct vcpu_runstate_info: int state, then u64 state_entry_time and time[4]
    start_info_magic: bytes

    @property
    def bits_per_evtchn_word(self) -> int:
        return 8 * self.word_bytes

    @property
    def evtchn_2l_nr_channels(self) -> int:
        """The 2-level ABI's ports: BITS_PER_EVTCHN_WORD(d) squared (xen/common/event_channel.h max_evtchns)."""
        return self.bits_per_evtchn_word**2

    @property
    def runstate_state_bytes(self) -> int:
        """Where state_entry_time starts: the int state padded to the u64s' alignment."""
        return self.runstate_info_size - 5 * 8

    def fits(self, value: int) -> bool:
        """Whether `value` fits in an unsigned long, pointer or xen_pfn_t of this guest."""
        return 0 <= value < 1 << self.address_size


GUEST_ABI = {
    64: GuestAbi(64, 8, SHARED_INFO_EVTCHN_MASK, VCPU_INFO_PENDING_SEL, RUNSTATE_INFO_SIZE, START_INFO_MAGIC),
    32: GuestAbi(32, 4, COMPAT_SHARED_INFO_EVTCHN_MASK, COMPAT_VCPU_INFO_PENDING_SEL, COMPAT_RUNSTATE_INFO_SIZE, START_INFO_MAGIC_PAE),
}
