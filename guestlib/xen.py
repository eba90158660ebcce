"""The guest's own copy of the parts of Xen's public ABI (xen/include/public) it uses.

Linux keeps such a copy in include/xen/interface/ rather than including Xen's tree, because
the guest is built apart from the hypervisor; so does guestlib, which may run on another host
than `hypervisor`. Names and grouping follow hypervisor/core/abi.py, and
tests/guest/test_abi_copy.py checks that every name both define has the same value.
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


# Domain ids.
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4

# Paging geometry: x86-64, 4 levels of 512 eight-byte entries.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512
PADDR_BITS = 52
PTE_MFN_MASK = ((1 << PADDR_BITS) - 1) & ~(PAGE_SIZE - 1)
PAGE_OFFSET = 0xFFFF880000000000  # 64-bit Linux's direct map, L4 slot 272
HYPERVISOR_VIRT_START = 0xFFFF800000000000
RO_MPT_VIRT_START = HYPERVISOR_VIRT_START  # machine_to_phys_mapping, read-only: one u64 pfn per mfn
# A 32-bit PAE guest's view: Xen's area is the top of the 4 GiB space from here, the compat M2P
# (u32 pfns) first (public/arch-x86/xen-x86_32.h, MACH2PHYS_VIRT_START_PAE).
HYPERVISOR_COMPAT_VIRT_START = 0xF5800000
INVALID_M2P = (1 << 64) - 1  # INVALID_M2P_ENTRY


class Pte(IntEnum):
    """Page-table entry flag bits (_PAGE_* in Linux)."""

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PSE = 1 << 7
    GLOBAL = 1 << 8
    NX = 1 << 63


class MmuCmd(IntEnum):
    """mmu_update commands, carried in the low 3 bits of the request's ptr."""

    NORMAL_PT_UPDATE = 0
    MACHPHYS_UPDATE = 1
    PT_UPDATE_PRESERVE_AD = 2
    PT_UPDATE_NO_TRANSLATE = 3


class MmuextCmd(IntEnum):
    """mmuext_op commands (MMUEXT_*); the wire carries these + 1 (common.proto)."""

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


# update_va_mapping flags: the low two bits pick the flush, the rest its scope (UVMF_LOCAL,
# UVMF_ALL, or else the guest virtual address of a vCPU bitmap).
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_LOCAL = 0
UVMF_ALL = 4

# HYPERVISOR_vm_assist (public/xen.h): the assists a Linux kernel turns on at boot.
VMASST_CMD_enable = 0
VMASST_TYPE_writable_pagetables = 2
VMASST_TYPE_pae_extended_cr3 = 3

# The start-info page at pfn 0 (xensim's layout, common.proto StartInfo): the magic, then these
# fields as little-endian u64 in this order from START_INFO_FIELD_OFFSET.
START_INFO_MAGIC = b"xen-3.0-x86_64"
START_INFO_MAGIC_PAE = b"xen-3.0-x86_32p"  # the builder's guest type for a 32-bit PAE kernel
START_INFO_FIELDS = (
    "nr_pages",
    "shared_info",
    "flags",
    "pt_base",
    "nr_pt_frames",
    "mfn_list",
    "first_free_pfn",
    "nr_vcpus",
    "nr_lowmem_pages",
    "pt_base_mfn",
)
START_INFO_FIELD_OFFSET = 32
SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1
MAX_VCPUS = 32  # vcpu_info slots in shared info (XEN_LEGACY_MAX_VCPUS)

# struct shared_info for x86_64: byte offsets.
SHARED_INFO_VCPU_INFO = 0
VCPU_INFO_SIZE = 64
VCPU_INFO_UPCALL_PENDING = 0  # u8 evtchn_upcall_pending
VCPU_INFO_UPCALL_MASK = 1  # u8 evtchn_upcall_mask
VCPU_INFO_PENDING_SEL = 8  # u64 evtchn_pending_sel: bit w = word w of evtchn_pending has news
SHARED_INFO_EVTCHN_PENDING = 2048  # u64 evtchn_pending[64]: port p is bit p % 64 of word p / 64
SHARED_INFO_EVTCHN_MASK = 2560  # u64 evtchn_mask[64], laid out likewise

# Event channels, 2-level ABI (public/event_channel.h).
BITS_PER_EVTCHN_WORD = 64
EVTCHN_2L_NR_CHANNELS = BITS_PER_EVTCHN_WORD * BITS_PER_EVTCHN_WORD
EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
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
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

# Event channels, FIFO ABI (public/event_channel.h): event-word bits and the control block.
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_MAX_QUEUES = 16
EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_CONTROL_READY = 0  # u32 ready
EVTCHN_FIFO_CONTROL_HEAD = 8  # u32 head[EVTCHN_FIFO_MAX_QUEUES]

# Virtual IRQs (public/xen.h). Per-vCPU: TIMER, DEBUG, XENOPROF, XENPMU.
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_XENOPROF = 7
VIRQ_XENPMU = 13
NR_VIRQS = 24

# vcpu_op commands (public/vcpu.h) and vcpu_guest_context flags (arch-x86/xen.h).
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

# sched_op commands and shutdown reasons (public/sched.h).
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

# struct vcpu_runstate_info (public/vcpu.h): int state padded to 8 bytes, u64 state_entry_time, u64 time[4].
RUNSTATE_INFO_SIZE = 48

# The compat ABI: what a 32-bit PAE guest sees differently on the wire (docs/pv32.md section 6).
COMPAT_SHARED_INFO_EVTCHN_MASK = SHARED_INFO_EVTCHN_PENDING + 32 * 4  # u32 evtchn_pending[32], then evtchn_mask[32]
COMPAT_VCPU_INFO_PENDING_SEL = 4  # u32 evtchn_pending_sel
COMPAT_RUNSTATE_INFO_SIZE = 44  # the u64s at 4-byte alignment


@dataclass(frozen=True)
class GuestAbi:
    """The wire layout of one address size, as hypervisor/core/abi.py has it: what a guest
    reads to find its event bits and the width of its words (docs/pv32.md section 6)."""

    address_size: int
    word_bytes: int  # xen_ulong_t: an event-channel word, a vcpumask word, a xen_pfn_t
    shared_info_evtchn_mask: int
    vcpu_info_pending_sel: int
    runstate_info_size: int
    start_info_magic: bytes

    @property
    def bits_per_evtchn_word(self) -> int:
        return 8 * self.word_bytes


GUEST_ABI = {
    64: GuestAbi(64, 8, SHARED_INFO_EVTCHN_MASK, VCPU_INFO_PENDING_SEL, RUNSTATE_INFO_SIZE, START_INFO_MAGIC),
    32: GuestAbi(32, 4, COMPAT_SHARED_INFO_EVTCHN_MASK, COMPAT_VCPU_INFO_PENDING_SEL, COMPAT_RUNSTATE_INFO_SIZE, START_INFO_MAGIC_PAE),
}


def guest_abi(magic: bytes | str) -> GuestAbi:
    """The layout a guest has by its start_info magic, as a kernel knows what it was built for
    ("xen-3.0-x86_64", or "xen-3.0-x86_32p" for PAE); ValueError for any other."""
    magic = magic.encode() if isinstance(magic, str) else magic
    for row in GUEST_ABI.values():
        if magic.rstrip(b"\0") == row.start_info_magic:
            return row
    raise ValueError(f"start_info magic {magic!r} is neither x86_64 nor x86_32p")
