"""Audit: recompute every reference from first principles and report each mismatch.

This is Xen 3.0's audit.c (docs/xen.md section 12.5) over the holder table of docs/xen.md section 12.1: starting from
nothing, add one general reference for each allocation, pin, vCPU base pointer, registered
vcpu_info and present entry of a validated table, and one type reference for each pin, base
pointer, registered vcpu_info, upper-level entry and writable L1 entry (a partial table holds what frames.py says: its entries below
nr_validated, a general reference for its PARTIAL_SET entry, and both kinds on itself; a
vCPU's old_guest_tables hold a general reference each; each FIFO event-array page and control
block Xen maps holds both kinds, docs/xen.md section 24.2); then every frame's counts must equal
what the frame table says, along with the invariants of docs/xen.md section 12.2 and P2M/M2P agreement,
then the event-channel port tables (`evtchn.audit`). A healthy model has no findings. A frame
quarantined by a domain's teardown (frames.quarantine) holds nothing and is reported with what
happened to it, since it is the trace of a bug.

Then isolation, which counts alone miss: every validated L4 holds Xen's entries in Xen's slots
(pagetable.xen_l4_slots), every validated PAE_XEN_L2 of a 32-bit guest in its top slots
(pagetable.compat_xen_l2_slots), each 32-bit vCPU's compat L4 holds its base in slot 0, and
every translation a domain can make reaches only frames it may
reach (`reachability`). A partial L4 is not checked for Xen's slots: Xen writes them when
promote_l4_table has validated the guest's slots (init_xen_l4_slots, xen/arch/x86/mm.c), so
one stopped on the way up holds what the guest left there, and one stopped on the way down
still holds Xen's; neither is a base or a pin, so no translation goes through it.

Each finding is about one domain, its *subject* (the owner of the frame or table it names, or
the domain whose vCPU, P2M, counts, ports or translation it names), or about the machine (free,
orphaned and quarantined frames, Xen's own). `audit_domain` finds one domain's findings at the
cost of that domain's frames: the holders it recounts are the domain's own tables and vCPUs and
those of privileged domains, the only ones the rules let hold references to its frames; when a
frame's counts are not explained by those, it recounts every holder in the machine, as the
whole audit does. So it reports exactly what `audit` reports about that domain, except when a
table of another unprivileged domain holds a reference to one of its frames (which the holder's
own audit reports: its translation reaches a foreign frame) and the frame's count is wrong by
just as much (a second bug that hides the first from the frame's side).
"""

import numpy as np

from .abi import DOMID_XEN, HYPERVISOR_COMPAT_VIRT_START, HYPERVISOR_L4_FIRST, HYPERVISOR_VIRT_END, INVALID_M2P, INVALID_MFN, L4_SLOT_LINEAR, L4_SLOT_RO_MPT, PAGE_SHIFT, PTE_MFN_MASK, PageType, Pte
from .domain import owned_frames
from .evtchn import audit as audit_ports
from .frames import ALLOCATED, NO_OWNER, NR_OWNERS, PAE_XEN_L2, PARTIAL, PARTIAL_SET, PINNED, VALIDATED, XEN_HEAP
from .pagetable import LEVEL_OF_TYPE, LEVELS, PAE_XEN_SLOTS, XEN_SLOTS

_P, _RW = np.uint64(Pte.PRESENT), np.uint64(Pte.RW)
_P_US = np.uint64(Pte.PRESENT | Pte.USER)
_MFN = np.uint64(PTE_MFN_MASK)
_SHIFT = np.uint64(PAGE_SHIFT)

Finding = tuple[int | None, str]  # (subject domid, or None for the machine; message)


def audit(hv) -> list[str]:
    """Every finding of the machine (see the module's docstring)."""
    return [message for _, message in findings(hv)]


def audit_domain(hv, domid: int) -> list[str]:
    """The findings whose subject is domain `domid` (see the module's docstring), at the cost
    of its own frames."""
    domain = hv.domain(domid)
    frames = hv.frames
    scope = _Scope(hv, owned_frames(frames, domain, int(np.count_nonzero(frames.owner == domid))))
    near = [d for d in hv.domains.values() if d is domain or d.privileged]
    tables = np.concatenate([_live(frames, scope.mfns)] + [_live(frames, owned_frames(frames, d)) for d in near if d is not domain])
    out: list[Finding] = []
    _hold_vcpus(hv, scope, near, out)
    _hold_tables(hv, scope, np.sort(tables), out)
    if _mismatched(frames, scope).any():  # recount what the rest of the machine holds on its frames
        rest = np.setdiff1d(_live(frames), tables, assume_unique=True)
        _hold_vcpus(hv, scope, [d for d in hv.domains.values() if d not in near], [])
        _hold_tables(hv, scope, rest, [])
    out += _frame_findings(hv, scope)
    heap = np.zeros(NR_OWNERS, dtype=np.int64)
    heap[domid] = np.count_nonzero(frames.flags[scope.mfns] & XEN_HEAP)
    tot = np.zeros(NR_OWNERS, dtype=np.int64)
    tot[domid] = len(scope.mfns) - heap[domid]
    out += _counters(hv, np.array([domid]), tot, heap)
    out += _p2m(hv, domain)
    out += xen_slots(hv, _live(frames, scope.mfns, PageType.L4))
    out += pae_xen_slots(hv, _live(frames, scope.mfns, PageType.L2))
    out += reachability(hv, domain, scope.mfns)
    out += [(domid, f) for f in audit_ports(hv, [domain])]
    return [message for subject, message in out if subject == domid]


def findings(hv) -> list[Finding]:
    """Every finding of the machine with its subject."""
    frames = hv.frames
    scope = _Scope(hv, None)
    out: list[Finding] = []
    _hold_vcpus(hv, scope, list(hv.domains.values()), out)
    _hold_tables(hv, scope, _live(frames), out)
    out += _frame_findings(hv, scope)
    free = frames.owner == NO_OWNER
    for mfn in np.flatnonzero(free & ((frames.flags != 0) | (hv.m2p != INVALID_M2P))).tolist():
        out.append((None, f"free mfn {mfn:#x} has flags {int(frames.flags[mfn])} or an M2P entry"))
    orphans = ~free & (frames.owner != DOMID_XEN) & ~np.isin(frames.owner, list(hv.domains))
    out += [(None, f"mfn {mfn:#x} is owned by dom{int(frames.owner[mfn])}, which does not exist") for mfn in np.flatnonzero(orphans).tolist()]
    out += [(None, f"mfn {mfn:#x} is quarantined (scrubbed, owned by Xen, never reallocated): {why}") for mfn, why in sorted(frames.quarantined.items())]
    heap = (frames.flags & XEN_HEAP) != 0
    has = [np.bincount(frames.owner[~free & kind], minlength=NR_OWNERS) for kind in (~heap, heap)]
    out += _counters(hv, np.flatnonzero(frames.tot_pages | frames.xenheap_pages | has[0] | has[1]), *has)
    for domain in hv.domains.values():
        out += _p2m(hv, domain)
    out += xen_slots(hv, _live(frames, None, PageType.L4))
    out += pae_xen_slots(hv, _live(frames, None, PageType.L2))
    out += reachability(hv)
    for domain in hv.domains.values():
        out += [(domain.domid, f) for f in audit_ports(hv, [domain])]
    return out


class _Scope:
    """The frames an audit recounts, every frame of the machine (`mfns` None) or a sorted
    few, with the counts their holders account for."""

    def __init__(self, hv, mfns: np.ndarray | None):
        frames = hv.frames
        self.mfns = mfns
        size = frames.nr_frames if mfns is None else len(mfns)
        self.tcount = np.zeros(size, dtype=np.int64)
        self.linear = np.zeros(size, dtype=np.int64)
        # What frames hold on themselves: the allocation a general reference, a shared-info
        # page its permanent writable type reference, a pin and a partial table both kinds.
        flags = self.of(frames.flags)
        self.count = ((flags & ALLOCATED) != 0).astype(np.int64)
        self.tcount[((flags & XEN_HEAP) != 0) & np.isin(self.of(frames.owner), list(hv.domains))] += 1
        for held in ((flags & PINNED) != 0, (flags & PARTIAL) != 0):
            self.count[held] += 1
            self.tcount[held] += 1

    def of(self, array: np.ndarray) -> np.ndarray:
        """A per-frame array of the frame table, for the frames of the scope."""
        return array if self.mfns is None else array[self.mfns]

    def add(self, counts: np.ndarray, mfns: np.ndarray, n: int = 1) -> None:
        """Add `n` to `counts` for each of `mfns` inside the scope (others are not its business)."""
        if self.mfns is not None:
            at = np.minimum(np.searchsorted(self.mfns, mfns), len(self.mfns) - 1)
            mfns = at[self.mfns[at] == mfns] if len(self.mfns) else at[:0]
        np.add.at(counts, mfns, n)


def _live(frames, mfns: np.ndarray | None = None, kind: PageType | None = None) -> np.ndarray:
    """The tables among `mfns` (None: the machine) whose entries hold references: validated
    with a type reference, or partial (for `kind` L4: validated ones only, see xen_slots)."""
    flags, tcount, types = (a if mfns is None else a[mfns] for a in (frames.flags, frames.type_count, frames.type))
    partial = (flags & PARTIAL) != 0
    live = ((tcount > 0) & ((flags & VALIDATED) != 0)) | partial
    if kind is not None:
        live &= ~partial & (types == kind)
    found = np.flatnonzero(live)
    return found if mfns is None else mfns[found]


def _subject(hv, mfn: int) -> int | None:
    owner = hv.frames.owner.item(mfn)
    return owner if owner in hv.domains else None


def _hold_vcpus(hv, scope: _Scope, domains: list, out: list[Finding]) -> None:
    """The references vCPUs hold: a general one for each old_guest_table (preempt.py), both
    kinds for each base pointer, which must be a validated L4, and for a registered vcpu_info,
    which must be writable. With them, both kinds for each FIFO control block and event-array
    page the domain's event channels map (map_guest_page, docs/xen.md section 24.2)."""
    frames = hv.frames
    held, bases, infos = [], [], []
    for domain in domains:
        if domain.evtchn_fifo is not None:
            infos += domain.evtchn_fifo.frames()
        for vcpu in domain.vcpus:
            held += vcpu.old_guest_tables
            if vcpu.vcpu_info_area is not None:  # a registered vcpu_info: both kinds, writable
                mfn = vcpu.vcpu_info_area[0]
                infos.append(mfn)
                if frames.type[mfn] != PageType.WRITABLE:
                    out.append((domain.domid, f"dom{domain.domid} vCPU {vcpu.vcpu_id} vcpu_info mfn {mfn:#x} is {PageType(frames.type[mfn]).name}, not WRITABLE"))
            root = domain.mode.root_type
            for base in (vcpu.guest_table, vcpu.guest_table_user):
                if base:
                    bases.append(base)
                    if frames.type[base] != root or not frames.flags[base] & VALIDATED:
                        out.append((domain.domid, f"dom{domain.domid} vCPU {vcpu.vcpu_id} base mfn {base:#x} is not a validated {root.name}"))
            if vcpu.compat_l4 and hv.memory.entries(vcpu.compat_l4).item(0) >> PAGE_SHIFT != vcpu.guest_table:
                out.append((domain.domid, f"dom{domain.domid} vCPU {vcpu.vcpu_id} compat L4 mfn {vcpu.compat_l4:#x} slot 0 does not hold its base mfn {vcpu.guest_table:#x}"))
    scope.add(scope.count, np.array(held + bases + infos, dtype=np.int64))
    scope.add(scope.tcount, np.array(bases + infos, dtype=np.int64))


def _hold_tables(hv, scope: _Scope, tables: np.ndarray, out: list[Finding]) -> None:
    """The references the entries of live `tables` (in mfn order) hold, and what is wrong
    with those entries (the subject is the table's owner)."""
    frames, memory = hv.frames, hv.memory
    n = frames.nr_frames
    slot_index = np.arange(len(LEVELS[1].guest_slots))
    for table in tables.tolist():
        level = hv.pagetables.level_of(table, frames.type.item(table))
        if level is not None:
            subject = _subject(hv, table)
            words = memory.entries(table)
            present = (words & _P) != 0
            if level.level > 1:
                present &= level.guest_slots
            if frames.flags[table] & PARTIAL:  # entries below nr_validated hold references
                if level.level == 1:
                    out.append((subject, f"L1 mfn {table:#x} is partial"))
                held = int(frames.nr_validated[table])
                if frames.flags[table] & PARTIAL_SET:  # and this one a general reference
                    scope.add(scope.count, np.array([int((words[held] & _MFN) >> _SHIFT)]))
                present &= slot_index < held
            entries = words[present]
            targets = ((entries & _MFN) >> _SHIFT).astype(np.int64)
            if (targets >= n).any():  # `reachability` names the entry
                entries, targets = entries[targets < n], targets[targets < n]
            if level.level == 1:
                scope.add(scope.count, targets)
                writable = targets[(entries & _RW) != 0]
                scope.add(scope.tcount, writable)
                wrong = writable[frames.type[writable] != PageType.WRITABLE]
                out += [(subject, f"L1 mfn {table:#x} maps mfn {t:#x} writable but its type is {PageType(frames.type[t]).name}") for t in wrong.tolist()]
                continue
            targets = targets[targets != table]  # self-linear entries hold nothing
            scope.add(scope.count, targets)
            scope.add(scope.tcount, targets)
            same = targets[frames.type[targets] == level.page_type]
            scope.add(scope.linear, np.array([table]), len(same))
            scope.add(scope.linear, same, -1)
            wrong = targets[(frames.type[targets] != level.target_type) & (frames.type[targets] != level.page_type)]
            out += [(subject, f"{level.name} mfn {table:#x} points at mfn {t:#x} of type {PageType(frames.type[t]).name}") for t in wrong.tolist()]


def _mismatched(frames, scope: _Scope) -> np.ndarray:
    return (scope.count != scope.of(frames.count)) | (scope.tcount != scope.of(frames.type_count)) | (scope.linear != scope.of(frames.linear))


def _frame_findings(hv, scope: _Scope) -> list[Finding]:
    """Each frame's counts against what its holders account for, and its type against them."""
    frames = hv.frames
    out: list[Finding] = []
    mfn_of = (lambda i: i) if scope.mfns is None else scope.mfns.item
    for what, expected, actual in (("general count", scope.count, frames.count), ("type count", scope.tcount, frames.type_count), ("linear count", scope.linear, frames.linear)):
        actual = scope.of(actual)
        for i in np.flatnonzero(expected != actual).tolist():
            mfn = mfn_of(i)
            out.append((_subject(hv, mfn), f"mfn {mfn:#x} ({frames.describe_owner(mfn)}, {PageType(frames.type[mfn]).name}): {what} is {int(actual[i])}, holders account for {int(expected[i])}"))
    tcount, flags, types = scope.of(frames.type_count), scope.of(frames.flags), scope.of(frames.type)
    unvalidated = (tcount > 0) & ((flags & VALIDATED) == 0) & ((flags & PARTIAL) == 0)
    out += [(_subject(hv, mfn_of(i)), f"mfn {mfn_of(i):#x} has {int(tcount[i])} type references but is not validated") for i in np.flatnonzero(unvalidated).tolist()]
    untyped = (tcount > 0) & (types == PageType.NONE)
    out += [(_subject(hv, mfn_of(i)), f"mfn {mfn_of(i):#x} has type references but no type") for i in np.flatnonzero(untyped).tolist()]
    return out


def _counters(hv, owners: np.ndarray, tot_pages: np.ndarray, xenheap_pages: np.ndarray) -> list[Finding]:
    """The frame table's per-owner counts (frames.py) against the frames each of `owners`
    has, by kind: `tot_pages` and `xenheap_pages`, indexed by owner."""
    frames = hv.frames
    out: list[Finding] = []
    for owner in owners.tolist():
        who = "Xen" if owner == DOMID_XEN else f"dom{owner}"
        for what, counted, has in (("tot_pages", frames.tot_pages.item(owner), tot_pages.item(owner)), ("xenheap_pages", frames.xenheap_pages.item(owner), xenheap_pages.item(owner))):
            if counted != has:
                out.append((owner if owner in hv.domains else None, f"{who}: {what} is {counted}, but it owns {has} such frames"))
    return out


def _p2m(hv, domain) -> list[Finding]:
    """The domain's P2M names distinct frames it owns, and the M2P maps them back (sort and
    compare neighbours to find a repeated mfn: a hash or set of a large P2M costs far more)."""
    frames, d = hv.frames, domain.domid
    pfns = np.flatnonzero(domain.p2m != INVALID_MFN)  # a frame given back has none (memop.py)
    p2m = domain.p2m[pfns]
    out: list[Finding] = []
    if (frames.owner[p2m] != d).any():
        out.append((d, f"dom{d}: P2M names frames the domain does not own"))
    ordered = np.sort(p2m)
    if (ordered[1:] == ordered[:-1]).any():
        out.append((d, f"dom{d}: P2M maps two pfns to one mfn"))
    checked = ~np.isin(p2m, list(domain.guest_m2p)) if domain.guest_m2p else np.ones(len(p2m), dtype=bool)
    for k in np.flatnonzero(checked & (hv.m2p[p2m] != pfns.astype(np.uint64))).tolist():
        out.append((d, f"dom{d}: P2M says pfn {int(pfns[k]):#x} is mfn {int(p2m[k]):#x}, M2P says that mfn is pfn {int(hv.m2p[p2m[k]]):#x}"))
    return out


def xen_slots(hv, l4s: np.ndarray) -> list[Finding]:
    """Every validated L4 holds Xen's own entries in slots 256..271 (init_xen_l4_slots wrote
    them at promotion, and nothing a guest can do writes them while the table is live), slot
    256 either empty or the read-only M2P (fill_ro_mpt)."""
    if not len(l4s):
        return []
    held = np.array([hv.memory.entries(l4)[XEN_SLOTS] for l4 in l4s.tolist()])
    want = np.tile(hv.pagetables.xen_l4_entries(0), (len(l4s), 1))
    want[:, L4_SLOT_LINEAR - HYPERVISOR_L4_FIRST] |= l4s.astype(np.uint64) << _SHIFT
    ro_mpt = L4_SLOT_RO_MPT - HYPERVISOR_L4_FIRST  # empty, or filled once a kernel base (fill_ro_mpt)
    filled = held[:, ro_mpt] == np.uint64(hv.pagetables.ro_mpt_entry)
    want[filled, ro_mpt] = held[filled, ro_mpt]
    return [
        (_subject(hv, int(l4s[i])), f"L4 mfn {int(l4s[i]):#x} slot {HYPERVISOR_L4_FIRST + j} holds {int(held[i, j]):#x}, not Xen's {int(want[i, j]):#x}")
        for i, j in zip(*(a.tolist() for a in np.nonzero(held != want)))
    ]


def pae_xen_slots(hv, l2s: np.ndarray) -> list[Finding]:
    """Every validated PAE_XEN_L2 (the L2 of a PV32 L3's slot 3) holds Xen's entries in slots
    428..511 (init_xen_pae_l2_slots wrote them at promotion; mod_l2_entry refuses them,
    docs/pv32.md section 3)."""
    l2s = l2s[(hv.frames.flags[l2s] & PAE_XEN_L2) != 0]
    want = hv.pagetables.compat_xen_l2
    return [
        (_subject(hv, l2), f"PAE_XEN_L2 mfn {l2:#x} slot {PAE_XEN_SLOTS.start + j} holds {int(held[j]):#x}, not Xen's {int(want[j]):#x}")
        for l2 in l2s.tolist()
        for held in [hv.memory.entries(l2)[PAE_XEN_SLOTS]]
        for j in np.flatnonzero(held != want).tolist()
    ]


def reachability(hv, domain=None, owned: np.ndarray | None = None) -> list[Finding]:
    """Every translation each domain's vCPUs can make reaches only frames the domain may reach
    (of `domain`, whose frames are `owned`, or of every domain); each finding's subject is the
    domain that translates.

    The roots are what a vCPU can run on or load cheaply: its kernel and user bases, the
    domain's pinned tables (each walked at its own level), and the translations its TLBs
    cache. A translation follows entries with PRESENT and USER at every level (a 64-bit guest
    runs in ring 3, so Xen's own entries, which lack USER, lead nowhere; a PV32 guest's kernel
    runs in ring 1 and follows PRESENT alone, to Xen's read-only compat M2P at most,
    docs/pv32.md section 2); every frame it passes
    through or ends at must be the domain's own, or, for a privileged domain (which may map
    foreign frames: get_page_from_l1e with a foreign pg_owner, xen/arch/x86/mm.c), any
    domain's, or one of Xen's read-only. A finding names one path from a root to the
    offending entry.

    The walk goes a level at a time over every table of every domain at that level at once
    (numpy over their stacked entries), so a table shared by many roots and paths is read
    once per level, and the cost is a few dozen numpy calls however many domains there are:
    cheap enough to run after every step of the state machine and at the end of a stress run
    of large guests.
    """
    frames = hv.frames
    if domain is None:
        domains = list(hv.domains.values())
        pinned = np.flatnonzero(frames.flags & PINNED)
    else:
        domains = [domain]
        pinned = owned[(frames.flags[owned] & PINNED) != 0]
    roots: list[tuple[str, int, int, int]] = []  # (label, level, mfn, owner domid)
    for domain in domains:
        d = domain.domid
        for what, attr in (("kernel base", "guest_table"), ("user base", "guest_table_user")):
            roots += [(f"dom{d} vCPU {v.vcpu_id} {what}", domain.mode.root, base, d) for v in domain.vcpus if (base := getattr(v, attr))]
    for mfn in pinned.tolist():
        level = LEVEL_OF_TYPE.get(frames.type.item(mfn))
        if level is not None and frames.owner.item(mfn) in hv.domains:
            d = frames.owner.item(mfn)
            roots.append((f"dom{d} pinned {level.name} mfn {mfn:#x}", level.level, mfn, d))
    reach = _Reach(hv)
    return reach.tables(roots) + reach.tlbs(domains)


class _Reach:
    """The reachability walk (see `reachability`)."""

    def __init__(self, hv):
        self.hv = hv
        self.frames = hv.frames
        self.privileged = [d for d, domain in hv.domains.items() if domain.privileged]

    def allowed(self, mfns: np.ndarray, writable: np.ndarray, domids: np.ndarray) -> np.ndarray:
        """Which of `mfns` (mapped `writable`) domains `domids` may reach."""
        frames = self.frames
        inside = mfns < frames.nr_frames
        owner = np.full(len(mfns), NO_OWNER, dtype=frames.owner.dtype)
        owner[inside] = frames.owner[mfns[inside]]
        ok = owner == domids
        if self.privileged:
            foreign = np.isin(owner, list(self.hv.domains)) | ((owner == DOMID_XEN) & ~writable)
            ok |= np.isin(domids, self.privileged) & foreign
        ok |= (mfns == self.hv.pagetables.ro_mpt_l3) & ~writable  # the read-only M2P, readable by every guest
        return ok

    def what(self, mfn: int, writable: bool) -> str:
        owner = self.frames.describe_owner(mfn)
        xen = mfn < self.frames.nr_frames and self.frames.owner.item(mfn) == DOMID_XEN
        return f"{owner}, writable" if writable and xen else owner

    def tables(self, roots: list[tuple[str, int, int, int]]) -> list[Finding]:
        """Walk from `roots`, level 4 down to 1. A node is a (table, writable so far, domain)
        at a level; it remembers the first (parent node, slot) that reached it, which names the
        path, and its root. Bookkeeping is per table, in Python; the entries are numpy."""
        memory = self.hv.memory
        findings: list[Finding] = []
        nodes: dict[int, list[tuple[int, bool, int, int, int]]] = {}  # (table, writable, parent, slot, root)
        children: list[tuple[int, bool, int, int, int]] = []
        for level in (4, 3, 2, 1):
            seen: dict[tuple[int, bool, int], None] = {}
            node = nodes[level] = []
            for table, writable, parent, slot, root in children + [(mfn, True, -1, -1, i) for i, (_, lv, mfn, _) in enumerate(roots) if lv == level]:
                key = (table, writable, roots[root][3])
                if key not in seen:
                    seen[key] = None
                    node.append((table, writable, parent, slot, root))
            if not node:
                children = []
                continue
            words = np.array([memory.entries(n[0]) for n in node])
            # The flags a walk needs: PRESENT and USER, or for a PV32 kernel (ring 1) PRESENT.
            need = np.where(self.frames.pv32[[roots[n[4]][3] for n in node]], _P, _P_US)[:, None]
            at, index = np.nonzero((words & need) == need)
            entries = words[at, index]
            targets = ((entries & _MFN) >> _SHIFT).astype(np.int64)
            rw = np.array([n[1] for n in node])[at] & ((entries & _RW) != 0)
            ok = self.allowed(targets, rw, np.array([roots[n[4]][3] for n in node], np.int64)[at])
            for k in np.flatnonzero(~ok).tolist():
                mfn = int(targets[k])
                root = roots[node[int(at[k])][4]]
                findings.append((root[3], f"{self.path(roots, nodes, level, int(at[k]), int(index[k]))} reaches mfn {mfn:#x} {self.what(mfn, bool(rw[k]))}"))
            if level > 1:
                take = np.flatnonzero(ok)
                children = [(t, w, p, s, node[p][4]) for t, w, p, s in zip(targets[take].tolist(), rw[take].tolist(), at[take].tolist(), index[take].tolist())]
        return findings

    @staticmethod
    def path(roots, nodes, level: int, at: int, slot: int) -> str:
        steps = []
        while True:
            table, _, parent, from_slot, root = nodes[level][at]
            steps.append(f"L{level} mfn {table:#x} entry {slot}")
            if parent < 0:
                return f"{roots[root][0]}: {' -> '.join(reversed(steps))}"
            at, slot, level = parent, from_slot, level + 1

    def tlbs(self, domains: list) -> list[Finding]:
        """Every cached translation maps a guest address to a frame its domain may reach."""
        vcpus = [v for domain in domains for v in domain.vcpus if v.tlb.entries]
        if not vcpus:
            return []
        cached = [entry for v in vcpus for entry in v.tlb.entries.values()]
        vas = np.array([vpn for v in vcpus for vpn in v.tlb.entries], np.uint64) << _SHIFT
        mfns = np.array([e.mfn for e in cached], np.int64)
        rw = (np.array([e.flags for e in cached], np.int64) & Pte.RW) != 0
        owners = [v for v in vcpus for _ in v.tlb.entries]
        pv32 = self.frames.pv32[[v.domid for v in owners]]
        guest = np.where(pv32, vas < np.uint64(HYPERVISOR_COMPAT_VIRT_START), (vas < np.uint64(1 << 47)) | (vas >= np.uint64(HYPERVISOR_VIRT_END)))
        findings = []
        for k in np.flatnonzero(~(guest & self.allowed(mfns, rw, np.array([v.domid for v in owners], np.int64)))).tolist():
            where = "" if guest[k] else " (not a guest address)"
            findings.append((owners[k].domid, f"dom{owners[k].domid} vCPU {owners[k].vcpu_id} TLB: va {int(vas[k]):#x}{where} maps mfn {int(mfns[k]):#x} {self.what(int(mfns[k]), bool(rw[k]))}"))
        return findings
