"""The guest's paging mode: the one description of what differs between an x86-64 PV kernel
and a 32-bit PAE one (docs/linux.md section 13). The kernel's code is written once against it.

x86-64 (`PV64`): four levels; the kernel half of every pgd is a copy of swapper's L4 slots
272..511, whose L3s below are shared; a second, user pgd per mm (NEW_USER_BASEPTR); PIN_L4.

PAE (`PAE`): three levels of eight-byte entries; the pgd is an L3 of which four entries matter,
each a pmd the mm owns: the user ones preallocated at pgd_alloc, and slot 3's kernel pmd, which
Xen (shared_kernel_pmd = 0) wants unshared, so each pgd has its own copy of swapper's kernel
pmd and the kernel entries are copied at level 2; the top entries are present-only (set_pgd);
no user pgd; PIN_L3; the fixmap is one L1 in the kernel pmd below Xen's compat slots.
"""

from dataclasses import dataclass

from .xen import GUEST_ABI, HYPERVISOR_COMPAT_VIRT_START, PAGE_OFFSET, PAGE_SHIFT, RO_MPT_VIRT_START, GuestAbi, MmuextCmd, guest_abi

L2_SHIFT = PAGE_SHIFT + 9


@dataclass(frozen=True)
class PagingMode:
    """How the guest's pagetables look in one of the two PV modes."""

    name: str
    address_size: int  # XEN_DOMCTL_set_address_size: 64, or 32 (compat)
    levels: int  # the pgd's level
    page_offset: int  # the direct map of lowmem
    pin_top: MmuextCmd  # how xen_pgd_pin pins the pgd
    user_pgd: bool  # 64-bit PV's second pgd for user mode
    kernel_level: int  # the level whose kernel entries every pgd's tree copies from swapper's
    kernel_slots: range  # those entries (slots of the kernel table at kernel_level)
    fixmap_base: int  # the fixmap's first page: its L1 hangs below kernel_slots[-1]
    m2p_base: int  # machine_to_phys_mapping as the guest sees it
    entry: int  # where a secondary vCPU starts (VCPUOP_initialise's rip: the kernel's text)
    top_flags: int  # the flags of a pgd entry naming a lower table

    @property
    def abi(self) -> GuestAbi:
        """The wire layout of this address size (start-info magic, word width, event bits)."""
        return GUEST_ABI[self.address_size]

    @property
    def start_info_magic(self) -> bytes:
        """How vCPU 0 tells its mode: the builder's guest type."""
        return self.abi.start_info_magic

    @property
    def word(self) -> int:
        """sizeof(unsigned long): bytes per entry of the P2M list and of the M2P."""
        return self.abi.word_bytes

    @staticmethod
    def slot(va: int, level: int) -> int:
        """The entry of a level-`level` table that maps va: nine bits per level in both modes
        (a PAE L3's index is va's bits 30..31)."""
        return (va >> (PAGE_SHIFT + 9 * (level - 1))) & 511

    @property
    def kernel_pgd_slot(self) -> int:
        """The pgd slot of the direct map: where a PAE pgd hangs its own kernel pmd."""
        return self.slot(self.page_offset, self.levels)

    @property
    def own_kernel_pmd(self) -> bool:
        """Whether each pgd has its own copy of swapper's kernel table below it (PAE)."""
        return self.kernel_level < self.levels

    @property
    def fixmap_tables(self) -> int:
        """Tables of the fixmap's own chain, from below kernel_level down to its L1."""
        return self.kernel_level - 1

    def user_pmd_slots(self) -> range:
        """PAE's preallocated user pmds (pgd_alloc: one per user pgd slot, so that a PAE pgd
        entry never changes while the pgd is live); none in x86-64."""
        return range(self.kernel_pgd_slot) if self.own_kernel_pmd else range(0)

    @property
    def invalid_p2m(self) -> int:
        """INVALID_P2M_ENTRY: ~0UL."""
        return (1 << 8 * self.word) - 1

    def m2p_va(self, mfn: int) -> int:
        return self.m2p_base + self.word * mfn


# Linux x86-64: __START_KERNEL_map's text (startup_xen); the fixmap in the top L4 slot.
PV64 = PagingMode(
    name="x86_64", address_size=64, levels=4, page_offset=PAGE_OFFSET,
    pin_top=MmuextCmd.PIN_L4_TABLE, user_pgd=True, kernel_level=4, kernel_slots=range(272, 512),
    fixmap_base=0xFFFFFF8000000000, m2p_base=RO_MPT_VIRT_START, entry=0xFFFFFFFF81000000, top_flags=0x67,  # _PAGE_TABLE
)  # fmt: skip
# Linux i386 PAE: PAGE_OFFSET 3 GiB, the kernel at 16 MiB above it; the kernel pmd's guest slots
# end where Xen's compat area begins (init_xen_pae_l2_slots), and the fixmap sits just below.
_PAE_XEN_L2_SLOT = (HYPERVISOR_COMPAT_VIRT_START - 0xC0000000) >> L2_SHIFT
PAE = PagingMode(
    name="pae", address_size=32, levels=3, page_offset=0xC0000000,
    pin_top=MmuextCmd.PIN_L3_TABLE, user_pgd=False, kernel_level=2, kernel_slots=range(0, _PAE_XEN_L2_SLOT),
    fixmap_base=0xC0000000 + ((_PAE_XEN_L2_SLOT - 1) << L2_SHIFT), m2p_base=HYPERVISOR_COMPAT_VIRT_START,
    entry=0xC1000000, top_flags=0x1,  # set_pgd: _PAGE_PRESENT only (a PDPTE)
)  # fmt: skip
MODES = {mode.address_size: mode for mode in (PV64, PAE)}


def mode_of_magic(magic: str) -> PagingMode:
    """The mode whose start-info magic (the builder's guest type) this is."""
    return MODES[guest_abi(magic).address_size]


def mode_of_start(started) -> PagingMode:
    """The mode a vCPU runs in, from its VcpuStarted: vCPU 0's start info names the builder's
    guest type (its magic), a secondary vCPU starts at the entry point its kernel gave
    VCPUOP_initialise (`entry`), which is below 4 GiB only for a 32-bit kernel."""
    if started.HasField("start_info"):
        return mode_of_magic(started.start_info.magic)
    return PAE if started.context.rip < 1 << 32 else PV64


def lowmem_pages(address_size: int, nr_pages: int) -> int:
    """How much of a domain's memory the kernel maps directly: all of it for x86-64; for PAE
    the share i386 Linux has of a 1 GiB machine, 896 MiB of 1024 (the rest above the direct
    map is highmem), scaled to the domain's size so that both are non-empty, and no more than
    the kernel pmd's slots below the fixmap can map."""
    return nr_pages if address_size == 64 else min(nr_pages * 896 // 1024, (_PAE_XEN_L2_SLOT - 1) * 512)
