"""Pagetable entry rules per level: validation (promote), devalidation (demote), mod_lN_entry.

Reference: docs/xen.md sections 2 and 3, docs/pv32.md section 3. The per-level differences
(disallowed flags, which type an entry's target takes, which slots belong to the guest, how Xen
adjusts stored entries) are the rows of the owner's paging mode (paging.py; `LEVELS` are the
64-bit rows); the code below is written once for all levels and both modes.

Validation and devalidation of an L2..L4 go entry by entry and may stop between entries when
the hypercall's work is spent (Xen's promote_lN_table / demote_lN_table with
hypercall_preempt_check), leaving the table partial (frames.py) to be gone on with later.
An L1 is validated as a whole with numpy: every check of docs/xen.md section 2.2 is computed for all 512
entries at once, the first failing entry (in slot order, checks in Xen's order) is reported,
and only when none fails are the references taken, in bulk. Because nothing is committed
before every entry has passed, a failed validation leaves no trace, which is the state Xen
reaches after dropping the references of slots 0..i-1. Upper levels have few present
entries and recurse, so they loop in Python.
"""

import numpy as np

from .abi import (
    ENTRIES_PER_TABLE,
    HYPERVISOR_COMPAT_VIRT_START,
    HYPERVISOR_L4_FIRST,
    HYPERVISOR_L4_LAST,
    INVALID_MFN,
    L2_SLOT_COMPAT_XEN_FIRST,
    L4_SLOT_DIRECTMAP,
    L4_SLOT_LINEAR,
    L4_SLOT_PERDOMAIN,
    L4_SLOT_RO_MPT,
    L4_SLOT_XEN,
    MACH2PHYS_COMPAT_VIRT_END,
    PAE_L3_MAX_MFN,
    PAE_L3_SLOTS,
    PAE_XEN_L3_SLOT,
    PAGE_SHIFT,
    PTE_MFN_MASK,
    STEP_WORK,
    Errno,
    PageType,
    Pte,
)
from .errors import Restart, SimulatorBug, XenError
from .frames import PAE_XEN_L2, PARTIAL_SET, PGT_PAE_XEN_L2, VALIDATED, FrameTable
from .paging import PV32, PV64, Level, PagingMode

P, RW, US, A, D, G = (int(f) for f in (Pte.PRESENT, Pte.RW, Pte.USER, Pte.ACCESSED, Pte.DIRTY, Pte.GLOBAL))
GUEST_KERNEL = int(Pte.GUEST_KERNEL)
CACHE_BITS = int(Pte.PWT | Pte.PCD)

# Flags whose change alone takes the fast path of mod_lN_entry (FASTPATH_FLAG_WHITELIST).
FASTPATH_WHITELIST = int(Pte.NX | Pte.AVAIL_HIGH | Pte.AVAIL | Pte.GLOBAL | Pte.DIRTY | Pte.ACCESSED | Pte.USER)

# The flags of Xen's own mappings (__PAGE_HYPERVISOR_RW, xen/arch/x86/include/asm/page.h):
# no USER, so no access of a PV guest, which always runs in ring 3, passes such an entry.
PAGE_HYPERVISOR_RW = P | RW | A | D | int(Pte.NX)
# The read-only M2P's entry in idle_pg_table (paging_init, xen/arch/x86/x86_64/mm.c):
# __PAGE_HYPERVISOR_RO | _PAGE_USER, the one entry of Xen's a guest may pass, for reading.
PAGE_RO_MPT = P | US | A | int(Pte.NX)
L4_ENTRY_FRAMES = 1 << (39 - PAGE_SHIFT)  # the frames one L4 slot spans (512 GiB)
XEN_SLOTS = slice(HYPERVISOR_L4_FIRST, HYPERVISOR_L4_LAST + 1)


def xen_l4_slots(xen_l3: int, nr_frames: int) -> np.ndarray:
    """Xen's entries for L4 slots 256..271 of a 64-bit PV guest, as init_xen_l4_slots
    (xen/arch/x86/mm.c) writes them when promote_l4_table has validated the guest's slots, with
    the linear slot's frame left 0 (each L4 maps itself there).

    Slot by slot: 256, the read-only M2P, is empty (promotion fills it only for an m2p_strict
    guest, `_promote_upper`; `PageTables.fill_ro_mpt` fills it when the table becomes a kernel
    base, docs/xen.md section 22); 257, PCI MMCONFIG, is
    empty (the model has no PCI); 258 maps the L4 itself; 259, the shadow linear map, is empty
    for a PV guest; 260 (per-domain area), 261 (Xen's text, M2P, frame table) and the
    direct-map slots from 262 that cover the machine's RAM hold Xen's own L3s, for which the
    model has one Xen-owned frame `xen_l3` with no contents. No guest walk ever enters them:
    a guest access to Xen's range faults before any walk (cpu), and they lack USER besides.
    """
    slots = np.zeros(HYPERVISOR_L4_LAST - HYPERVISOR_L4_FIRST + 1, dtype=np.uint64)
    directmap = min(-(-nr_frames // L4_ENTRY_FRAMES), HYPERVISOR_L4_LAST + 1 - L4_SLOT_DIRECTMAP)
    for slot in (L4_SLOT_PERDOMAIN, L4_SLOT_XEN, *range(L4_SLOT_DIRECTMAP, L4_SLOT_DIRECTMAP + directmap)):
        slots[slot - HYPERVISOR_L4_FIRST] = (xen_l3 << PAGE_SHIFT) | PAGE_HYPERVISOR_RW
    slots[L4_SLOT_LINEAR - HYPERVISOR_L4_FIRST] = PAGE_HYPERVISOR_RW
    return slots


def compat_xen_l2_slots(m2p_frame: int, nr_frames: int) -> np.ndarray:
    """Xen's entries for the slots of a PGT_pae_xen_l2 L2 from COMPAT_L2_PAGETABLE_FIRST_XEN_SLOT
    (428) to 511, as init_xen_pae_l2_slots (xen/arch/x86/pv/mm.c) copies them from
    compat_idle_pg_table_l2: from HYPERVISOR_COMPAT_VIRT_START the compat M2P, a 2 MiB superpage
    (PSE|PRESENT: no USER, no RW, readable by the guest kernel in ring 1 only) per 512Ki mfns the
    machine has (paging_init, xen/arch/x86/x86_64/mm.c), for which the model has the one frame
    `m2p_frame`; the rest empty. No walk enters them: the CPU answers Xen's hole itself (cpu.py)."""
    slots = np.zeros(ENTRIES_PER_TABLE - L2_SLOT_COMPAT_XEN_FIRST, dtype=np.uint64)
    chunks = min(-(-nr_frames * 4 // (1 << 21)), (MACH2PHYS_COMPAT_VIRT_END - HYPERVISOR_COMPAT_VIRT_START) >> 21)
    slots[:chunks] = (m2p_frame << PAGE_SHIFT) | P | int(Pte.PSE)
    return slots


LEVELS: dict[int, Level] = PV64.levels
LEVEL_OF_TYPE = {lv.page_type: lv for lv in LEVELS.values()}
PAE_XEN_SLOTS = slice(L2_SLOT_COMPAT_XEN_FIRST, ENTRIES_PER_TABLE)

_U64 = np.uint64
_MFN_MASK = _U64(PTE_MFN_MASK)


def entry_mfn(entry: int) -> int:
    return (entry & PTE_MFN_MASK) >> PAGE_SHIFT


def flag_names(entry: int) -> str:
    return "|".join(f.name for f in Pte if f.bit_count() == 1 and entry & f) or "0"


def adjust_l1e(entry: int) -> int:
    """adjust_guest_l1e for a 64-bit guest: kernel pages get USER|GUEST_KERNEL, user pages
    USER|GLOBAL (the guest kernel runs in ring 3). Idempotent, like Xen's."""
    if not entry & US:
        entry |= US | GUEST_KERNEL
    if not entry & GUEST_KERNEL:
        entry |= G | US
    return entry


def adjust_entry(level: Level, entry: int) -> int:
    if not entry & P:
        return entry
    return adjust_l1e(entry) if level.adjust_l1 else entry | level.adjust


def has_changed(old: int, new: int) -> bool:
    """lNe_has_changed(old, new, ~whitelist): frame or a non-whitelisted flag differs."""
    return bool((old ^ new) & ~FASTPATH_WHITELIST & 0xFFFFFFFFFFFFFFFF)


class PageTables:
    """Validation and checked updates of pagetable frames, over one frame table."""

    def __init__(self, frames: FrameTable, xen_l3: int, ro_mpt_l3: int):
        self.frames = frames
        self.memory = frames.memory
        self._xen_l4 = xen_l4_slots(xen_l3, frames.nr_frames)
        self.compat_xen_l2 = compat_xen_l2_slots(ro_mpt_l3, frames.nr_frames)
        # Whether promote_l3_table lets a PV32 L3 above 4 GiB through for domain `domid`:
        # before its vCPU 0 is initialised (the toolstack's slack), or with VMASST
        # pae_extended_cr3. Set by the Hypervisor, which knows the domains.
        self.high_l3_ok = lambda domid: True
        # Whether domain `domid` has VMASST m2p_strict (docs/xen.md section 22). Set likewise.
        self.m2p_strict = lambda domid: False
        self.ro_mpt_l3 = ro_mpt_l3  # Xen's frame that stands for the read-only M2P's L3
        self.ro_mpt_entry = (ro_mpt_l3 << PAGE_SHIFT) | PAGE_RO_MPT
        frames.promote = self.promote
        frames.promote_l1s = self.promote_l1s
        frames.demote = self.demote
        self.entries_validated = 0  # counter for benchmarks and stats

    def mode(self, domid: int) -> PagingMode:
        """The paging mode of domain `domid` (of a frame's owner)."""
        return PV32 if self.frames.pv32.item(domid) else PV64

    def level_of(self, mfn: int, kind: int) -> Level | None:
        """The row of table `mfn` of type `kind` (its own) by its owner's mode and its
        PGT_pae_xen_l2 bit; None for a type that is no pagetable's."""
        frames = self.frames
        return self.mode(frames.owner.item(mfn)).level_of(kind, bool(frames.flags.item(mfn) & PAE_XEN_L2))

    # -- leaf entries (docs/xen.md section 2.2) ------------------------------------------------------

    def get_page_from_l1e(self, entry: int, pg_owner: int) -> None:
        """Take the references a present L1 entry holds, or raise Xen's errno."""
        level = LEVELS[1]
        frames = self.frames
        if entry & level.disallow:
            raise XenError(Errno.EINVAL, f"bad L1 flags {flag_names(entry & level.disallow)}")
        mfn = entry_mfn(entry)
        if mfn >= frames.nr_frames:
            if mfn == INVALID_MFN:
                raise XenError(Errno.EINVAL, "maps the invalid mfn")
            raise XenError(Errno.EPERM, f"maps mfn {mfn:#x} outside RAM (MMIO) without I/O memory permission")
        if not frames.get_page(mfn, pg_owner):
            raise XenError(Errno.EBUSY, f"maps mfn {mfn:#x} {frames.describe_owner(mfn)}, not dom{pg_owner}")
        if entry & RW:
            try:
                frames.get_page_type(mfn, PageType.WRITABLE)
            except XenError as e:
                frames.put_page(mfn)
                raise XenError(Errno.EBUSY, f"maps mfn {mfn:#x} writable but {e.message}") from None

    def put_page_from_l1e(self, entry: int) -> None:
        if not entry & P:
            return
        mfn = entry_mfn(entry)
        if entry & RW:
            self.frames.put_page_and_type(mfn)
        else:
            self.frames.put_page(mfn)

    # -- upper-level entries (docs/xen.md section 2.3) -------------------------------------------------

    def get_page_from_upper(self, level: Level, entry: int, table: int, domid: int, partial_set: bool = False, want: int | None = None) -> None:
        """Take the references an L2..L4 entry of `table` holds: the next level's type (or
        `want`) on its target, or, failing that with EINVAL, a read-only linear reference to a
        same-level table where the level has them (self-references take none). With
        `partial_set` the entry already holds a partial reference, which this goes on with
        (Xen's PTF_partial_set)."""
        frames = self.frames
        if entry & level.disallow:
            raise XenError(Errno.EINVAL, f"bad {level.name} flags {flag_names(entry & level.disallow)}")
        mfn = entry_mfn(entry)
        try:
            frames.get_page_and_type(mfn, domid, level.target_type if want is None else want, partial_set)
        except XenError as e:
            if e.errno != Errno.EINVAL or partial_set or want is not None or not level.linear or not self._get_linear(level, entry, mfn, table, domid):
                raise XenError(e.errno, f"points at mfn {mfn:#x}: {e.message}") from None

    def _get_linear(self, level: Level, entry: int, mfn: int, table: int, domid: int) -> bool:
        frames = self.frames
        if entry & RW:
            return False
        if mfn == table:
            return True
        if frames.owner.item(table) != domid or not 0 <= mfn < frames.nr_frames:
            return False
        if frames.type.item(mfn) != level.page_type or not frames.flags.item(mfn) & VALIDATED:
            return False
        if frames.linear.item(table) < 0 or frames.linear.item(mfn) > 0:
            return False
        if not frames.get_page(mfn, domid):
            return False
        frames.get_page_type(mfn, level.page_type)  # validated and same type: cannot fail
        frames.linear[table] += 1
        frames.linear[mfn] -= 1
        return True

    def put_page_from_upper(self, level: Level, entry: int, table: int, partial_set: bool = False) -> None:
        """Drop what an L2..L4 entry of `table` holds (with `partial_set`: a partial
        reference, whose linear count was settled when its devalidation began)."""
        if not entry & P:
            return
        mfn = entry_mfn(entry)
        if mfn == table:
            return
        frames = self.frames
        if not partial_set and frames.type.item(mfn) == level.page_type:
            frames.linear[table] -= 1
            frames.linear[mfn] += 1
        frames.put_page_and_type(mfn, partial_set)

    # -- whole tables ----------------------------------------------------------------------

    def promote(self, mfn: int, kind: PageType) -> None:
        """Validate every entry of a frame that is gaining pagetable type `kind` (docs/xen.md section 2.4)."""
        level = self.level_of(mfn, kind)
        domid = self.frames.owner.item(mfn)
        if level.level == 1:
            self.promote_l1s(np.array([mfn]), domid)
        else:
            self._promote_upper(level, mfn, domid)
            self.entries_validated += ENTRIES_PER_TABLE

    def promote_l1s(self, mfns: np.ndarray, domid: int) -> None:
        """Validate the entries of L1 frames `mfns` of `domid` in one numpy pass (one frame
        unless the domain builder validates its tables together, frames.get_l1_types_bulk).
        A failing entry of a lone frame raises what Xen's promote_l1_table does; of frames
        validated together, it is a bug of the builder that made them."""
        self.frames.budget.charge(ENTRIES_PER_TABLE * len(mfns))
        words = self.memory.entries(int(mfns[0]))[None] if len(mfns) == 1 else np.stack([self.memory.entries(mfn) for mfn in mfns.tolist()])
        present = np.flatnonzero(words.reshape(-1) & _U64(P))
        if len(present):
            self._get_l1_references(mfns, domid, words, present, self.mode(domid).levels[1])
        self.entries_validated += ENTRIES_PER_TABLE * len(mfns)

    def _get_l1_references(self, mfns: np.ndarray, domid: int, words: np.ndarray, present: np.ndarray, level: Level) -> None:
        """Take the references of the `present` entries (indices into `words` flattened, the
        contents of `mfns` a row each) and store them adjusted (a 64-bit guest's: Xen stores a
        PV32 guest's L1 entries as written), or raise with none taken."""
        frames = self.frames
        entries = words.reshape(-1)[present]
        targets = ((entries & _MFN_MASK) >> _U64(PAGE_SHIFT)).astype(np.int64)
        bad_flags = (entries & _U64(level.disallow)) != 0
        outside = targets >= frames.nr_frames
        safe = np.where(outside, 0, targets) if outside.any() else targets
        foreign = (frames.owner[safe] != domid) | (frames.count[safe] == 0)
        rw = (entries & _U64(RW)) != 0
        busy = rw & (frames.type_count[safe] != 0) & (frames.type[safe] != PageType.WRITABLE)
        failed = bad_flags | outside | foreign | busy
        if failed.any():
            i = int(np.argmax(failed))
            row, slot = divmod(int(present[i]), ENTRIES_PER_TABLE)
            mfn = int(mfns[row])
            if len(mfns) > 1:
                raise SimulatorBug(f"L1 entry {slot} of mfn {mfn:#x}, validated with {len(mfns) - 1} other tables, is invalid")
            try:
                self.get_page_from_l1e(int(entries[i]), domid)
            except XenError as e:
                # promote_l1_table took the references of the entries before this one and now
                # drops them: a frame one of them mapped writable keeps the WRITABLE type.
                frames.get_pages_bulk(targets[:i], targets[:i][rw[:i]], domid)
                frames.put_pages_bulk(targets[:i], targets[:i][rw[:i]])
                raise XenError(e.errno, f"L1 entry {slot} of mfn {mfn:#x} {e.message}") from None
            raise SimulatorBug(f"vectorised L1 check refused entry {slot} of mfn {mfn:#x}, scalar accepted")
        frames.get_pages_bulk(targets, targets[rw], domid)
        if not level.adjust_l1:
            return
        kernel = (entries & _U64(US)) == 0
        adjusted = entries | np.where(kernel, _U64(US | GUEST_KERNEL), _U64(0))
        adjusted |= np.where((adjusted & _U64(GUEST_KERNEL)) == 0, _U64(G | US), _U64(0))
        changed = adjusted != entries
        if changed.any():
            stored = words.copy()
            stored.reshape(-1)[present] = adjusted
            rows = np.zeros(len(mfns), dtype=bool)
            rows[present[changed] // ENTRIES_PER_TABLE] = True
            for row in np.flatnonzero(rows).tolist():
                mfn = int(mfns[row])
                frames.note_write(mfn)
                self.memory.frame(mfn)[:] = stored[row]

    def _promote_upper(self, level: Level, mfn: int, domid: int) -> None:
        """Xen's promote_lN_table from entry nr_validated on (0 unless the table is partial).

        Before every entry but the first it checks the call's work; when that is spent it
        stops (Restart) with the entries so far held. An entry whose target stopped part-way
        keeps a partial reference (PARTIAL_SET). On a failure it drops the entries it took,
        unless the validation went on with earlier calls' work (frames.spanning): then, as in
        Xen, the table keeps them, partial, for a preemptible teardown."""
        frames = self.frames
        pae_l3 = level is PV32.levels[3]
        if pae_l3:
            self._pae_l3_start(mfn, domid)
        words = self.memory.entries(mfn)
        present = (words & _U64(P)) != 0
        first = frames.nr_validated.item(mfn)
        resuming = bool(frames.flags.item(mfn) & PARTIAL_SET)
        slots = np.flatnonzero(present & level.guest_slots)
        todo = slots[slots >= first].tolist()
        if pae_l3 and PAE_XEN_L3_SLOT not in todo and first <= PAE_XEN_L3_SLOT:
            todo.append(PAE_XEN_L3_SLOT)  # not present: refused below
        done: list[int] = []
        for slot in todo:
            partial_set = resuming and slot == first
            if done and frames.preempt_check():
                frames.stop_at(mfn, slot, False)
                raise Restart
            frames.budget.charge(STEP_WORK)
            entry = int(words[slot])
            try:
                if pae_l3 and slot == PAE_XEN_L3_SLOT:
                    self._get_pae_xen_l2(level, entry, mfn, domid, partial_set)
                else:
                    self.get_page_from_upper(level, entry, mfn, domid, partial_set)
            except Restart:
                frames.stop_at(mfn, slot, True)
                raise
            except XenError as e:
                held = frames.left_partial(entry_mfn(entry)) or partial_set
                if frames.spanning():
                    frames.stop_at(mfn, slot, held)
                else:
                    with frames.atomic():
                        for taken in reversed(done):
                            self.put_page_from_upper(level, int(words[taken]), mfn)
                raise XenError(e.errno, f"{level.name} entry {slot} of mfn {mfn:#x} {e.message}") from None
            done.append(slot)
        slots = slots.tolist()
        self.frames.note_write(mfn)
        if slots:
            table = self.memory.frame(mfn)
            index = np.asarray(slots)
            table[index] |= _U64(level.adjust)
        if level.level == 4:  # init_xen_l4_slots: the read-only M2P now only for m2p_strict
            self.memory.frame(mfn)[XEN_SLOTS] = self.xen_l4_entries(mfn)
            if self.m2p_strict(domid):
                self.memory.frame(mfn)[L4_SLOT_RO_MPT] = self.ro_mpt_entry
        elif level.pae_xen_l2:
            self.memory.frame(mfn)[PAE_XEN_SLOTS] = self.compat_xen_l2  # init_xen_pae_l2_slots

    def _pae_l3_start(self, mfn: int, domid: int) -> None:
        """What promote_l3_table does to a PV32 PAE L3 before its entries
        (docs/pv32.md section 3): refuse one at or above 4 GiB (-ERANGE) unless the domain may have one, then
        zero entries 4..511, which the MMU sees in compat mode but a PAE guest need not set."""
        if mfn >= PAE_L3_MAX_MFN and not self.high_l3_ok(domid):
            raise XenError(Errno.ERANGE, f"PAE L3 mfn {mfn:#x} is at or above 4 GiB and dom{domid} has no VMASST pae_extended_cr3")
        words = self.memory.entries(mfn)
        if words[PAE_L3_SLOTS:].any():
            self.frames.note_write(mfn)
            self.memory.frame(mfn)[PAE_L3_SLOTS:] = 0

    def _get_pae_xen_l2(self, level: Level, entry: int, table: int, domid: int, partial_set: bool) -> None:
        """Slot 3 of a PV32 PAE L3 (promote_l3_table): present, and an L2 that takes the type
        PGT_pae_xen_l2 for this L3 alone (pae_xen_mappings_check: a type count of 1), since
        Xen's slots in it map what belongs to this L3's address space (docs/pv32.md section 3)."""
        if not entry & P:
            raise XenError(Errno.EINVAL, f"is not present: Xen needs slot {PAE_XEN_L3_SLOT}'s L2 for its own mappings")
        self.get_page_from_upper(level, entry, table, domid, partial_set, want=PageType.L2 | PGT_PAE_XEN_L2)
        l2 = entry_mfn(entry)
        if self.frames.type_count.item(l2) != 1:
            self.frames.put_page_and_type(l2)  # Xen keeps it (a leak); a failed call here changes nothing
            raise XenError(Errno.EINVAL, f"points at mfn {l2:#x}, the PAE_XEN_L2 of another L3 too (pae_xen_mappings_check)")

    def xen_l4_entries(self, l4: int) -> np.ndarray:
        """What Xen's slots 256..271 of L4 `l4` hold once it is validated (`xen_l4_slots`):
        written over whatever the guest left there, and never read as the guest's entries
        (validation, devalidation and audit skip them: they hold no reference)."""
        entries = self._xen_l4.copy()
        entries[L4_SLOT_LINEAR - HYPERVISOR_L4_FIRST] |= _U64(l4 << PAGE_SHIFT)
        return entries

    def fill_ro_mpt(self, l4: int, domid: int) -> None:
        """Map the read-only M2P in slot 256 of a validated L4 that becomes a kernel base, if
        it is empty (fill_ro_mpt, xen/arch/x86/mm.c, called by new_guest_cr3 and
        arch_set_info_guest for a guest without m2p_strict, whose L4s have it from promotion;
        docs/xen.md section 22). The entry stays until the table is promoted again."""
        words = self.memory.frame(l4)
        if not self.m2p_strict(domid) and not words.item(L4_SLOT_RO_MPT):
            words[L4_SLOT_RO_MPT] = self.ro_mpt_entry

    def zap_ro_mpt(self, l4: int, domid: int) -> None:
        """Empty slot 256 of a validated L4 that becomes a user base of an m2p_strict guest, so
        its user mode cannot read the M2P (zap_ro_mpt, xen/arch/x86/mm.c, called by
        MMUEXT_NEW_USER_BASEPTR and arch_set_info_guest; docs/xen.md section 22)."""
        if self.m2p_strict(domid):
            self.memory.frame(l4)[L4_SLOT_RO_MPT] = 0

    def demote(self, mfn: int, kind: PageType) -> None:
        """Drop the references every entry of a table holds (docs/xen.md section 1.6); cannot fail.

        An L2..L4 goes from its last held entry down (Xen's demote_lN_table) and, like
        `_promote_upper`, stops between entries when the call's work is spent (Restart)."""
        level = self.level_of(mfn, kind)
        frames = self.frames
        words = self.memory.entries(mfn)
        if level.level == 1:
            frames.budget.charge(ENTRIES_PER_TABLE)
            entries = words[(words & _U64(P)) != 0]
            targets = ((entries & _MFN_MASK) >> _U64(PAGE_SHIFT)).astype(np.int64)
            frames.put_pages_bulk(targets, targets[(entries & _U64(RW)) != 0])
            return
        end = frames.nr_validated.item(mfn)
        resuming = bool(frames.flags.item(mfn) & PARTIAL_SET)
        slots = np.flatnonzero(((words & _U64(P)) != 0) & level.guest_slots)
        todo = slots[slots < end][::-1].tolist()
        if resuming:
            todo.insert(0, end)
        for n, slot in enumerate(todo):
            if n and frames.preempt_check():
                frames.stop_at(mfn, slot + 1, False)
                raise Restart
            frames.budget.charge(STEP_WORK)
            try:
                self.put_page_from_upper(level, int(words[slot]), mfn, resuming and slot == end)
            except Restart:
                frames.stop_at(mfn, slot, True)
                raise
            if level.unadjust:  # unadjust_guest_l3e: the entry reads as the guest wrote it
                self.memory.frame(mfn)[slot] &= ~_U64(level.unadjust)
        frames.stop_at(mfn, 0, False)

    # -- checked single-entry update (docs/xen.md section 3) -------------------------------------------

    def mod_entry(self, level: Level, table: int, slot: int, new: int, pt_owner: int, pg_owner: int, preserve_ad: bool = False) -> None:
        """Xen's mod_lN_entry: write entry `slot` of validated table `table`, taking the new
        entry's references before dropping the old one's. Raises with nothing changed."""
        if not level.update_slots[slot]:
            raise XenError(level.update_errno, f"{level.name} entry {slot} of mfn {table:#x} is in Xen's private area")
        if level.level > 1 and pg_owner != pt_owner:
            raise XenError(Errno.EINVAL, f"{level.name} update of mfn {table:#x} with a foreign page owner")
        words = self.memory.entries(table)
        old = int(words[slot])
        if preserve_ad:
            new |= old & (A | D)
        if new & P:
            if new & level.disallow:
                raise XenError(
                    Errno.EINVAL,
                    f"{level.name} entry {slot} of mfn {table:#x}: bad {level.name} flags {flag_names(new & level.disallow)}",
                )
            new = adjust_entry(level, new)
            if old & P and not has_changed(old, new):
                self.memory.frame(table)[slot] = new
                return
            try:
                if level.level == 1:
                    self.get_page_from_l1e(new, pg_owner)
                else:
                    self.get_page_from_upper(level, new, table, pt_owner)
            except XenError as e:
                raise XenError(e.errno, f"{level.name} entry {slot} of mfn {table:#x} {e.message}") from None
        self.memory.frame(table)[slot] = new
        if level.level == 1:
            self.put_page_from_l1e(old)
        else:
            self.put_page_from_upper(level, old, table)
