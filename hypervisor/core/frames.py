"""The frame table: per-mfn owner, type, counts and flags, and the reference primitives.

Theory of operation (reference: docs/xen.md sections 1 and 12).

Every machine frame has a general reference count and a type with a type count. Whoever
depends on a frame existing holds a general reference: the owning domain's allocation (the
`ALLOCATED` bit plus one count), a pin, each vCPU base pointer, each present pagetable entry
that points at the frame. Whoever depends on the frame keeping its *type* also holds a type
reference: a pin, a base pointer and an upper-level entry hold a pagetable type (L1..L4), a
writable L1 entry holds the `WRITABLE` type. A frame has one type at a time, so a frame with
writable mappings cannot become a pagetable and a live pagetable cannot be mapped writable.

A frame is *validated* when it first gains a pagetable type: every present entry is checked
and takes its own references (recursively for upper levels). When its type count falls to
zero it is *devalidated*: every entry's references are dropped (recursively). Pinning holds one
type reference for as long as the guest wants, so the table stays validated and a cr3 load of a
pinned table is O(1) instead of a walk over the whole tree: that is why guests pin.

Long (de)validation is preemptible, as in Xen (preempt.py). An L2..L4 whose validation or
devalidation stops part-way is left *partial* (Xen's PGT_partial): entries below
`nr_validated` hold their references, the entry at `nr_validated` holds a general reference
to a partial frame of its own if `PARTIAL_SET` is set (Xen's PTF_partial_set), and the frame
itself holds its one type reference and one extra general reference (Xen's get_page_light) for
the work in progress. Whoever takes the same type next goes on validating from there; whoever
holds the partial state (a parent entry, a vCPU's old_guest_table, domain destruction) may
instead go on devalidating it. L1s are validated and devalidated in one go, as in Xen.

All counts change only in the primitives of this module (`get_page`, `put_page`,
`get_page_type`, `put_page_type`, and their bulk forms used by vectorised L1 validation);
`audit` recomputes them from first principles.

The frame table also keeps, per owner, how many frames it owns (Xen's d->tot_pages and
d->xenheap_pages, docs/xen.md section 21), changed wherever a frame changes owner, so that the
toolstack's views of a domain cost nothing however large the machine (audit recomputes them).

A frame whose references a dying domain's teardown could not account for (a bug of the
simulator) is *quarantined*: scrubbed, its counts cleared, owned by Xen and kept out of the free
pool for good, as Xen keeps a page it offlines while in use off its free lists
(xen/common/page_alloc.c, offline_page). No guest can take a reference to it again.
"""

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from .abi import DOMID_XEN, ENTRIES_PER_TABLE, INVALID_M2P, Errno, PageType
from .errors import Restart, SimulatorBug, XenError
from .memory import MachineMemory
from .preempt import Budget

NO_OWNER = -1
NR_OWNERS = 1 << 16  # every domid, DOMID_XEN among them, indexes the per-owner counts

# Frame flags (Xen's PGC_allocated, PGT_validated, PGT_pinned, PGC_xen_heap).
ALLOCATED = 1
VALIDATED = 2
PINNED = 4
XEN_HEAP = 8
QUARANTINED = 16  # set alone: see quarantine
PARTIAL = 32  # PGT_partial: (de)validation stopped part-way (see above)
PARTIAL_SET = 64  # PTF_partial_set in Xen's partial_flags: the entry at nr_validated is partial
PAE_XEN_L2 = 128  # PGT_pae_xen_l2: an L2 under slot 3 of a PV32 PAE L3, part of its type (docs/pv32.md section 3)

# A type to take with the PGT_pae_xen_l2 bit: `PageType.L2 | PGT_PAE_XEN_L2`, as Xen ORs it into
# the type it asks get_page_type for. A frame of type L2 without it is another type, and back.
PGT_PAE_XEN_L2 = 0x10

PAGETABLE_TYPES = (PageType.L1, PageType.L2, PageType.L3, PageType.L4)
_WRITABLE = int(PageType.WRITABLE)
_NONE = int(PageType.NONE)


class FrameTable:
    """Per-frame metadata as numpy arrays indexed by mfn, plus the free-frame allocator."""

    def __init__(self, nr_frames: int, memory: MachineMemory):
        self.nr_frames = nr_frames
        self.memory = memory
        self.owner = np.full(nr_frames, NO_OWNER, dtype=np.int32)
        self.type = np.zeros(nr_frames, dtype=np.int8)
        self.type_count = np.zeros(nr_frames, dtype=np.int64)
        self.count = np.zeros(nr_frames, dtype=np.int64)
        self.flags = np.zeros(nr_frames, dtype=np.uint8)
        # Xen's linear_pt_count: > 0 the table holds that many linear entries, < 0 it is the
        # target of that many linear entries (docs/xen.md section 2.3).
        self.linear = np.zeros(nr_frames, dtype=np.int32)
        # Xen's nr_validated_ptes: how far a partial table's (de)validation got.
        self.nr_validated = np.zeros(nr_frames, dtype=np.int16)
        # Xen's M2P (machine_to_phys_mapping): mfn -> pfn, INVALID_M2P for a frame no guest
        # owns; freeing a frame resets its entry (free_heap_pages, xen/common/page_alloc.c).
        self.m2p = np.full(nr_frames, INVALID_M2P, dtype=np.uint64)
        # Preemption: the vCPU whose hypercall may stop part-way (Xen's `current` on a
        # preemptible path, set by Hypervisor._dispatch; None while work must finish in one
        # go), and the work budget.
        self.current = None
        self.budget = Budget()
        self._nested = 0  # depth of (de)validation in progress: puts and gets inside it are not the call's own
        # Hooks set by the owner of the model: (de)validation of pagetable frames, and Xen's
        # safety TLB flush when a frame changes type or is freed.
        self.promote: Callable[[int, PageType], None] = _unset
        self.demote: Callable[[int, PageType], None] = _unset
        self.promote_l1s: Callable[[np.ndarray, int], None] = _unset
        self.forget_mappings: Callable[[int], None] = lambda mfn: None
        self.forget_mappings_of: Callable[[np.ndarray, int], None] = lambda mfns, owner: None  # the same for many frames of one owner
        # Frames owned, by owner (domid or DOMID_XEN): Xen-heap pages apart, as Xen counts them.
        self.tot_pages = np.zeros(NR_OWNERS, dtype=np.int64)
        self.xenheap_pages = np.zeros(NR_OWNERS, dtype=np.int64)
        # Per owner: a 32-bit PV domain's (is_pv_32bit_domain), which picks its paging mode
        # (paging.py); set by the domain builder before it validates anything.
        self.pv32 = np.zeros(NR_OWNERS, dtype=bool)
        self._alloc_cursor = 0
        # mfn -> why it was quarantined (see quarantine), for audit.
        self.quarantined: dict[int, str] = {}
        # The contents of the frames that the type acquisition in progress has rewritten, as
        # they were before (see get_page_type).
        self._journal: list[tuple[int, np.ndarray | None]] | None = None
        self._took_over = False  # that acquisition went on with a partial frame
        self._left_partial: int | None = None  # the frame whose failure a parent entry now holds

    # -- allocation ---------------------------------------------------------------------

    def alloc(self, domid: int, n: int, xen_heap: bool = False) -> np.ndarray:
        """Assign `n` free frames to `domid` (lowest free first), each with the allocation ref;
        with `xen_heap`, Xen-heap pages shared with it (share_xen_page_with_guest)."""
        free = self._first_free(self._alloc_cursor, n)
        if len(free) < n:
            free = self._first_free(0, n)
        if len(free) < n:
            raise XenError(Errno.ENOMEM, f"machine has {len(free)} free frames, {n} wanted")
        self._assign(free, domid, xen_heap)
        return free

    def alloc_extent(self, domid: int, order: int, below: int) -> np.ndarray | None:
        """An extent of 2**order free frames, contiguous and aligned to its size as Xen's buddy
        allocator gives them (alloc_domheap_pages), all below mfn `below` (MEMF_bits), assigned
        to `domid`; None if the machine has none."""
        size = 1 << order
        if size == 1 and below >= self.nr_frames:
            return self.alloc(domid, 1) if self.free_frames() else None
        top = min(below, self.nr_frames) // size * size
        blocks = np.flatnonzero((self.owner[:top] == NO_OWNER).reshape(-1, size).all(axis=1))
        if not len(blocks):
            return None
        extent = np.arange(blocks[0] * size, (blocks[0] + 1) * size)
        self._assign(extent, domid)
        return extent

    def _assign(self, free: np.ndarray, domid: int, xen_heap: bool = False) -> None:
        """Make free frames `domid`'s, each with the allocation ref, and count them (Xen's
        assign_pages and domain_adjust_tot_pages): alloc's and alloc_extent's one path."""
        self.owner[free] = domid
        self.count[free] = 1
        self.flags[free] = ALLOCATED | (XEN_HEAP if xen_heap else 0)
        self.type[free] = _NONE
        (self.xenheap_pages if xen_heap else self.tot_pages)[domid] += len(free)
        self._alloc_cursor = int(free[-1]) + 1 if len(free) else self._alloc_cursor

    def _first_free(self, start: int, n: int) -> np.ndarray:
        """The `n` lowest free frames from `start` on (fewer if there are not as many), found
        in windows that double from `n`, so that a small allocation on a large machine reads
        little more of the frame table than it takes."""
        found, have, window = [], 0, max(n, ENTRIES_PER_TABLE)
        while have < n and start < self.nr_frames:
            free = np.flatnonzero(self.owner[start : start + window] == NO_OWNER) + start
            found.append(free)
            have += len(free)
            start += window
            window *= 2
        return np.concatenate(found)[:n] if found else np.zeros(0, dtype=np.int64)

    def _disown(self, mfns: np.ndarray) -> None:
        """Take frames off their owners' counts, before they change owner."""
        heap = (self.flags[mfns] & XEN_HEAP) != 0
        np.subtract.at(self.tot_pages, self.owner[mfns[~heap]], 1)
        np.subtract.at(self.xenheap_pages, self.owner[mfns[heap]], 1)

    def free_frames(self) -> int:
        """Frames nobody owns: all but those the per-owner counts count (audit checks them)."""
        return self.nr_frames - int(self.tot_pages.sum()) - int(self.xenheap_pages.sum())

    # -- general references ---------------------------------------------------------------

    def get_page(self, mfn: int, domid: int) -> bool:
        """Take a general reference on a frame owned by `domid` (Xen's get_page)."""
        if not 0 <= mfn < self.nr_frames or self.count.item(mfn) == 0 or self.owner.item(mfn) != domid:
            return False
        self.count[mfn] += 1
        return True

    def put_page(self, mfn: int) -> None:
        """Drop a general reference; the last one frees the frame (Xen's put_page)."""
        left = self.count.item(mfn) - 1
        if left < 0:
            raise SimulatorBug(f"put_page of mfn {mfn:#x} with no references")
        self.count[mfn] = left
        if left == 0:
            self._free(mfn)

    def _free(self, mfn: int) -> None:
        if self.type_count.item(mfn):
            raise SimulatorBug(f"mfn {mfn:#x} freed with {self.type_count.item(mfn)} type references")
        self.forget_mappings(mfn)  # Xen's flush on free; needs the owner to find its vCPUs
        (self.xenheap_pages if self.flags.item(mfn) & XEN_HEAP else self.tot_pages)[self.owner.item(mfn)] -= 1
        self.owner[mfn] = NO_OWNER
        self.type[mfn] = _NONE
        self.flags[mfn] = 0
        self.linear[mfn] = 0
        self.m2p[mfn] = INVALID_M2P
        self.memory.scrub(mfn)

    def release(self, mfns: np.ndarray) -> None:
        """Drop the allocation reference of every frame in `mfns` at once (Xen's
        put_page_alloc_ref over a dying domain's page list) and free those left with no
        reference of either kind. A frame that something still references stays allocated
        to its owner, for the caller to deal with."""
        mfns = mfns[(self.flags[mfns] & ALLOCATED) != 0]
        self.flags[mfns] &= ~np.uint8(ALLOCATED)
        self.count[mfns] -= 1
        gone = mfns[(self.count[mfns] == 0) & (self.type_count[mfns] == 0)]
        self._disown(gone)
        self.owner[gone] = NO_OWNER
        self.type[gone] = _NONE
        self.flags[gone] = 0
        self.linear[gone] = 0
        self.m2p[gone] = INVALID_M2P
        self.memory.scrub_many(gone)

    def quarantine(self, mfns: np.ndarray, why: str) -> None:
        """Take frames out of use for good (see the module's docstring): scrubbed, owned by
        Xen with no reference, type or flag but QUARANTINED, so that `alloc` never hands them
        out and `get_page` never grants one. `why` says what happened, for audit."""
        for mfn in mfns.tolist():
            self.quarantined[mfn] = f"{why} left it {self.describe_counts(mfn)}"
            self.memory.scrub(mfn)
        self._disown(mfns)
        self.tot_pages[DOMID_XEN] += len(mfns)
        self.owner[mfns] = DOMID_XEN
        self.type[mfns] = _NONE
        self.type_count[mfns] = 0
        self.count[mfns] = 0
        self.flags[mfns] = QUARANTINED
        self.linear[mfns] = 0

    # -- preemption -------------------------------------------------------------------------

    @contextmanager
    def atomic(self):
        """Work that must finish in one go, even inside a preemptible call."""
        current, self.current = self.current, None
        try:
            yield
        finally:
            self.current = current

    def preempt_check(self) -> bool:
        """Xen's hypercall_preempt_check, on a preemptible path only."""
        return self.current is not None and self.budget.spent()

    def stop_at(self, mfn: int, slot: int, partial_set: bool) -> None:
        """Record where a table's (de)validation stopped: entries below `slot` hold their
        references, and with `partial_set` the one at `slot` holds a partial reference."""
        self.nr_validated[mfn] = slot
        if partial_set:
            self.flags[mfn] |= np.uint8(PARTIAL_SET)
        else:
            self.flags[mfn] &= ~np.uint8(PARTIAL_SET)

    def is_partial(self, mfn: int, kind: int) -> bool:
        return bool(self.flags.item(mfn) & PARTIAL) and self.type.item(mfn) == kind & ~PGT_PAE_XEN_L2

    def left_partial(self, mfn: int) -> bool:
        """Whether the failure just raised left frame `mfn` partial, its general reference
        kept for the failing entry that points at it (Xen's "transfer" of old_guest_table to
        the parent's PTF_partial_set)."""
        left, self._left_partial = self._left_partial, None
        return left == mfn

    def _leave_partial(self, mfn: int) -> None:
        """The frame keeps its type reference for the work in progress, and a general one with
        it (Xen's get_page_light and PGT_partial)."""
        self.flags[mfn] |= np.uint8(PARTIAL)
        self.count[mfn] += 1

    def _defer(self, mfn: int) -> None:
        """Hand a partial frame, with the caller's general reference on it, to the calling
        vCPU to tear down before its call ends (Xen's old_guest_table)."""
        if self.current is None:
            raise SimulatorBug(f"mfn {mfn:#x} left partial outside a preemptible call")
        self.current.old_guest_tables.append(mfn)

    def put_old_guest_tables(self, vcpu) -> bool:
        """Go on tearing down the vCPU's old_guest_tables (Xen's put_old_guest_table); True
        when none is left, False when the work stopped again."""
        while vcpu.old_guest_tables:
            mfn = vcpu.old_guest_tables[0]
            try:
                self.put_page_type(mfn, partial_set=True)
            except Restart:
                return False
            vcpu.old_guest_tables.pop(0)
            self.put_page(mfn)
        return True

    # -- type references ------------------------------------------------------------------

    def get_page_type(self, mfn: int, want: int) -> None:
        """Take a type reference of type `want` (a PageType, with PGT_PAE_XEN_L2 for the L2 of
        a PAE L3's slot 3), validating on first use (docs/xen.md section 1.4).

        Raises `XenError(EINVAL)` on a type conflict, or the validation errno. On failure no
        reference is kept, and the type bits are what Xen leaves: a frame whose validation
        failed holding nothing has no type (validate_page's error path sets type_info = 0,
        xen/arch/x86/mm.c) and the tables validated on the way, whose references the failure
        dropped again, keep their type unvalidated. Without type references those bits decide no
        more than whether the next type taken flushes TLBs (trace.state_digest), so the failed
        call still changes nothing. Xen also leaves the entries it adjusted while validating;
        those are guest memory, which a failed call must leave as it was, so we restore them
        (README). The exception is a validation that went on with a partial frame, whose earlier
        work other calls may have seen: as in Xen, what it holds stays partial, to be torn down
        preemptibly (see get_page_and_type), and the frames it holds keep their entries.

        Raises `Restart` when a preemptible validation stopped part-way (the frame is partial).
        """
        self.atomically(lambda: self._get_page_type(mfn, want))

    def atomically(self, action: Callable[[], None]) -> None:
        """Run `action`, whose type acquisitions then succeed together or leave no trace: if it
        raises XenError, the types and entries that validation changed inside it are put back.
        That needs the references it took dropped first: a failing acquisition drops its own,
        and `action` drops any it took before, then re-raises. Nested calls join the outer one."""
        if self._journal is not None:
            return action()
        self._journal, self._took_over = [], False
        try:
            action()
        except XenError:
            for frame, words in reversed(self._journal):
                if not self.type_count.item(frame):  # else still held: part of a partial tree
                    self.memory.restore(frame, words)
            raise
        finally:
            self._journal = None

    def spanning(self) -> bool:
        """Whether the type acquisition in progress went on with a partial frame, so that
        undoing it on failure could be as long as the work of earlier calls."""
        return self._took_over

    def note_write(self, mfn: int) -> None:
        """Record a frame's contents before validation rewrites its entries (see above)."""
        if self._journal is not None:
            self._journal.append((mfn, self.memory.snapshot(mfn)))

    def _retype(self, mfn: int, want: int) -> None:
        self.type[mfn] = want
        self.forget_mappings(mfn)  # Xen's filtered TLB flush on a type change (step 7)

    def _get_page_type(self, mfn: int, want: int) -> None:
        count = self.type_count.item(mfn)
        flags = self.flags.item(mfn)
        have = self.type.item(mfn) | (PGT_PAE_XEN_L2 if flags & PAE_XEN_L2 else 0)
        if count:
            if have != want:
                raise XenError(
                    Errno.EINVAL,
                    f"mfn {mfn:#x} has type {type_name(have)} with {count} type references, "
                    f"cannot take type {type_name(want)}",
                )
            if flags & VALIDATED:
                self.type_count[mfn] = count + 1
                return
            if not flags & PARTIAL:
                raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is being validated as {PageType(have).name}")
            # Xen's _get_page_type on a PGT_partial page: take the work over and go on with it;
            # the partial state's type reference becomes ours, its general one is dropped.
            self._took_over = True
            self.flags[mfn] &= ~np.uint8(PARTIAL)
            try:
                self._validate(mfn, want)
            finally:
                self.put_page(mfn)
            return
        if have != want:
            self._retype(mfn, want & ~PGT_PAE_XEN_L2)
            self.flags[mfn] = (flags & ~(VALIDATED | PAE_XEN_L2)) | (PAE_XEN_L2 if want & PGT_PAE_XEN_L2 else 0)
        self.type_count[mfn] = 1
        if self.flags.item(mfn) & VALIDATED:
            return
        if want & ~PGT_PAE_XEN_L2 in PAGETABLE_TYPES:
            self.stop_at(mfn, 0, False)
            self._validate(mfn, want)
        else:
            self.flags[mfn] |= VALIDATED

    def _validate(self, mfn: int, want: int) -> None:
        """Xen's validate_page: validated, or partial (stopped, or failed holding entries that
        only a preemptible teardown may drop), or untyped again (failed holding nothing)."""
        self._nested += 1
        try:
            self.promote(mfn, PageType(want & ~PGT_PAE_XEN_L2))
        except Restart:
            self._leave_partial(mfn)
            raise
        except XenError:
            if self.nr_validated.item(mfn) or self.flags.item(mfn) & PARTIAL_SET:
                self._leave_partial(mfn)
            else:
                self.type_count[mfn] = 0
                self.type[mfn] = _NONE  # validate_page: type_info = 0
                self.flags[mfn] &= ~np.uint8(PAE_XEN_L2)
            raise
        finally:
            self._nested -= 1
        self.flags[mfn] = (self.flags.item(mfn) & ~PARTIAL_SET) | VALIDATED

    def put_page_type(self, mfn: int, partial_set: bool = False) -> None:
        """Drop a type reference; the last one of a pagetable devalidates it (docs/xen.md section 1.6).

        The type bits stay, so taking the same type again re-validates from scratch. With
        `partial_set` the caller holds a partial frame's work rather than a type reference
        (Xen's PTF_partial_set): go on devalidating it, if nobody has finished it meanwhile.
        Raises `Restart` when a preemptible devalidation stopped part-way (the frame is partial).
        """
        flags = self.flags.item(mfn)
        was_partial = bool(flags & PARTIAL)
        if partial_set and not was_partial:
            return
        if was_partial and not partial_set:
            raise SimulatorBug(f"put_page_type of partial mfn {mfn:#x} by a holder of no partial reference")
        count = self.type_count.item(mfn)
        if count <= 0:
            raise SimulatorBug(f"put_page_type of mfn {mfn:#x} with no type references")
        kind = self.type.item(mfn)
        if count == 1 and kind in PAGETABLE_TYPES and flags & (VALIDATED | PARTIAL):
            if not was_partial:
                self.stop_at(mfn, ENTRIES_PER_TABLE, False)  # every entry holds its references
            self.flags[mfn] &= ~np.uint8(VALIDATED | PARTIAL)
            self._nested += 1
            try:
                self.demote(mfn, PageType(kind))
            except Restart:
                self._leave_partial(mfn)
                if was_partial:
                    self.put_page(mfn)
                raise
            finally:
                self._nested -= 1
            self.linear[mfn] = 0
            self.type_count[mfn] = 0
            self.flags[mfn] &= ~np.uint8(PAE_XEN_L2)  # demote_l2_table, once done
            if was_partial:
                self.put_page(mfn)
            return
        self.type_count[mfn] = count - 1

    def get_page_and_type(self, mfn: int, domid: int, want: int, partial_set: bool = False) -> None:
        """A general and a type reference together (Xen's get_page_and_type_from_mfn). With
        `partial_set` the caller already holds the general reference, and a partial frame's
        work, which this goes on with.

        When the validation stops (Restart) or fails leaving the frame partial, the general
        reference stays with whoever holds the partial state next: a table's entry inside a
        validation (the parent records PARTIAL_SET), else the calling vCPU's old_guest_table
        after a failure. A call of its own drops it on Restart, since retrying takes it anew.
        """
        if not partial_set and not self.get_page(mfn, domid):
            raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is {self.describe_owner(mfn)}, not owned by dom{domid}")
        try:
            self.get_page_type(mfn, want)
        except Restart:
            if not partial_set and not self._nested:
                self.put_page(mfn)
            raise
        except XenError:
            if partial_set:
                raise
            if self.is_partial(mfn, want):
                if self._nested:
                    self._left_partial = mfn
                else:
                    self._defer(mfn)
                raise
            self.put_page(mfn)
            raise

    def put_page_and_type(self, mfn: int, partial_set: bool = False) -> None:
        """Drop a general and a type reference. A call's own put that stops part-way hands the
        partial frame, with the general reference, to its vCPU's old_guest_table (as Xen's
        UNPIN_TABLE, new_guest_cr3 and mod_l3/l4_entry do), and the call goes on."""
        try:
            self.put_page_type(mfn, partial_set)
        except Restart:
            if self._nested:
                raise
            self._defer(mfn)
            return
        self.put_page(mfn)

    # -- bulk forms for vectorised L1 (de)validation ----------------------------------------

    def get_pages_bulk(self, mfns: np.ndarray, writable: np.ndarray, owner: int) -> None:
        """Commit the references of a validated L1: a general ref per entry and a writable
        type ref per RW entry. The caller has already checked every entry (all are frames of
        `owner`)."""
        np.add.at(self.count, mfns, 1)
        if len(writable):
            retype = writable[(self.type_count[writable] == 0) & (self.type[writable] != _WRITABLE)]
            if len(retype):  # _retype of each at once (a frame mapped twice is named twice)
                self.type[retype] = _WRITABLE
                self.forget_mappings_of(retype, owner)
            self.flags[writable] |= np.uint8(VALIDATED)
            np.add.at(self.type_count, writable, 1)

    def get_l1_types_bulk(self, mfns: np.ndarray, domid: int) -> None:
        """Take an L1 type reference on each of `mfns`, frames of `domid` with none, validating
        them together in one numpy pass: `get_page_type` of each at once, for the domain
        builder's boot tables (domain.build), which would otherwise cost a few numpy calls
        per table of a large guest. Their validation cannot fail: the builder made them."""
        if (self.type_count[mfns] != 0).any() or (self.owner[mfns] != domid).any():
            raise SimulatorBug(f"bulk L1 validation of frames that are typed or not dom{domid}'s: {mfns.tolist()[:8]}")
        retype = mfns[self.type[mfns] != PageType.L1]
        self.type[retype] = PageType.L1
        self.forget_mappings_of(retype, domid)
        self.flags[mfns] &= ~np.uint8(VALIDATED | PARTIAL_SET)
        self.nr_validated[mfns] = 0
        self.type_count[mfns] = 1
        self.promote_l1s(mfns, domid)
        self.flags[mfns] |= np.uint8(VALIDATED)

    def put_pages_bulk(self, mfns: np.ndarray, writable: np.ndarray) -> None:
        """Drop what `get_pages_bulk` took; frames whose last reference goes are freed."""
        if len(writable):
            np.subtract.at(self.type_count, writable, 1)
            if (self.type_count[writable] < 0).any():
                raise SimulatorBug("writable type count below zero while devalidating an L1")
        np.subtract.at(self.count, mfns, 1)
        gone = mfns[self.count[mfns] <= 0]
        if len(gone):
            if (self.count[gone] < 0).any():
                raise SimulatorBug("general count below zero while devalidating an L1")
            for mfn in np.unique(gone).tolist():
                self._free(mfn)

    def locked_type(self, mfn: int) -> int | None:
        """The type of a frame that Xen's page_lock would accept (typed, with type references,
        validated), else None: how mmu_update and ptwr decide a frame is a live pagetable."""
        if self.type_count.item(mfn) and self.flags.item(mfn) & VALIDATED:
            return self.type.item(mfn)
        return None

    # -- pins --------------------------------------------------------------------------------

    def is_pinned(self, mfn: int) -> bool:
        return bool(self.flags.item(mfn) & PINNED)

    def set_pinned(self, mfn: int, pinned: bool) -> None:
        if pinned:
            self.flags[mfn] |= np.uint8(PINNED)
        else:
            self.flags[mfn] &= ~np.uint8(PINNED)

    # -- descriptions for error messages and FrameInfo -----------------------------------

    def describe_owner(self, mfn: int) -> str:
        if not 0 <= mfn < self.nr_frames:
            return "outside machine memory"
        owner = self.owner.item(mfn)
        if self.flags.item(mfn) & QUARANTINED:
            return "quarantined"
        return "free" if owner == NO_OWNER else f"owned by dom{owner}"

    def describe_counts(self, mfn: int) -> str:
        return f"{PageType(self.type.item(mfn)).name} with count {self.count.item(mfn)} and type count {self.type_count.item(mfn)}"

    def info(self, mfn: int) -> dict:
        flags = self.flags.item(mfn)
        owner = self.owner.item(mfn)
        return {
            "mfn": mfn,
            "owner": None if owner == NO_OWNER else owner,
            "type": PageType(self.type.item(mfn)).name,
            "type_count": self.type_count.item(mfn),
            "count": self.count.item(mfn),
            "allocated": bool(flags & ALLOCATED),
            "validated": bool(flags & VALIDATED),
            "pinned": bool(flags & PINNED),
            "xen_heap": bool(flags & XEN_HEAP),
            "quarantined": bool(flags & QUARANTINED),
            "pae_xen_l2": bool(flags & PAE_XEN_L2),
        }


def type_name(kind: int) -> str:
    """A type as Xen's messages name it, PGT_pae_xen_l2 included."""
    return PageType(kind & ~PGT_PAE_XEN_L2).name + ("|PAE_XEN_L2" if kind & PGT_PAE_XEN_L2 else "")


def _unset(mfn: int, kind: PageType) -> None:
    raise SimulatorBug("frame table used before its pagetable hooks were set")
