"""Audit: recompute every reference from first principles and report each mismatch.

This is Xen 3.0's audit.c (docs/xen.md section 12.5) over the holder table of docs/xen.md section 12.1: starting from
nothing, add one general reference for each allocation, pin, vCPU base pointer and present
entry of a validated table, and one type reference for each pin, base pointer, upper-level
entry and writable L1 entry (a partial table holds what frames.py says: its entries below
nr_validated, a general reference for its PARTIAL_SET entry, and both kinds on itself; a
vCPU's old_guest_tables hold a general reference each; each FIFO event-array page and control
block Xen maps holds both kinds, docs/xen.md section 20.2); then every frame's counts must equal
what the frame table says, along with the invariants of docs/xen.md section 12.2 and P2M/M2P agreement,
then the event-channel port tables (`evtchn.audit`). A healthy model has no findings. A frame
quarantined by a domain's teardown (frames.quarantine) holds nothing and is reported with what
happened to it, since it is the trace of a bug.

Then isolation, which counts alone miss: every validated L4 holds Xen's entries in Xen's slots
(pagetable.xen_l4_slots), and every translation a domain can make reaches only frames it may
reach (`reachability`). A partial L4 is not checked for Xen's slots: Xen writes them when
promote_l4_table has validated the guest's slots (init_xen_l4_slots, xen/arch/x86/mm.c), so
one stopped on the way up holds what the guest left there, and one stopped on the way down
still holds Xen's; neither is a base or a pin, so no translation goes through it.
"""

import numpy as np

from .abi import DOMID_XEN, HYPERVISOR_L4_FIRST, HYPERVISOR_VIRT_END, L4_SLOT_LINEAR, PAGE_SHIFT, PTE_MFN_MASK, PageType, Pte
from .domain import INVALID_M2P
from .evtchn import audit as audit_ports
from .frames import ALLOCATED, NO_OWNER, PARTIAL, PARTIAL_SET, PINNED, VALIDATED, XEN_HEAP
from .pagetable import LEVEL_OF_TYPE, LEVELS, XEN_SLOTS

_P, _RW = np.uint64(Pte.PRESENT), np.uint64(Pte.RW)
_P_US = np.uint64(Pte.PRESENT | Pte.USER)
_MFN = np.uint64(PTE_MFN_MASK)
_SHIFT = np.uint64(PAGE_SHIFT)


def audit(hv) -> list[str]:
    frames, memory = hv.frames, hv.memory
    n = frames.nr_frames
    count = ((frames.flags & ALLOCATED) != 0).astype(np.int64)
    tcount = np.zeros(n, dtype=np.int64)
    linear = np.zeros(n, dtype=np.int64)
    findings: list[str] = []

    guest_heap = ((frames.flags & XEN_HEAP) != 0) & (frames.owner != NO_OWNER) & np.isin(frames.owner, list(hv.domains))
    tcount[guest_heap] += 1  # shared-info: a permanent writable type reference
    pinned = (frames.flags & PINNED) != 0
    count[pinned] += 1
    tcount[pinned] += 1
    partial = (frames.flags & PARTIAL) != 0
    count[partial] += 1  # a partial table holds its own type reference and a general one
    tcount[partial] += 1
    for domain in hv.domains.values():
        if domain.evtchn_fifo is not None:  # map_guest_page: a general and a writable type reference each
            for mfn in domain.evtchn_fifo.frames():
                count[mfn] += 1
                tcount[mfn] += 1
        for vcpu in domain.vcpus:
            for mfn in vcpu.old_guest_tables:  # a general reference each (preempt.py)
                count[mfn] += 1
            for base in (vcpu.guest_table, vcpu.guest_table_user):
                if base:
                    count[base] += 1
                    tcount[base] += 1
                    if frames.type[base] != PageType.L4 or not frames.flags[base] & VALIDATED:
                        findings.append(f"dom{domain.domid} vCPU {vcpu.vcpu_id} base mfn {base:#x} is not a validated L4")

    live = ((frames.type_count > 0) & ((frames.flags & VALIDATED) != 0)) | partial
    slot_index = np.arange(len(LEVELS[1].guest_slots))
    for level in LEVELS.values():
        for table in np.flatnonzero(live & (frames.type == level.page_type)).tolist():
            words = memory.entries(table)
            present = (words & _P) != 0
            if level.level > 1:
                present &= level.guest_slots
            if frames.flags[table] & PARTIAL:  # entries below nr_validated hold references
                if level.level == 1:
                    findings.append(f"L1 mfn {table:#x} is partial")
                held = int(frames.nr_validated[table])
                if frames.flags[table] & PARTIAL_SET:  # and this one a general reference
                    count[int((words[held] & _MFN) >> _SHIFT)] += 1
                present &= slot_index < held
            entries = words[present]
            targets = ((entries & _MFN) >> _SHIFT).astype(np.int64)
            if (targets >= n).any():  # `reachability` names the entry
                entries, targets = entries[targets < n], targets[targets < n]
            if level.level == 1:
                np.add.at(count, targets, 1)
                writable = targets[(entries & _RW) != 0]
                np.add.at(tcount, writable, 1)
                wrong = writable[frames.type[writable] != PageType.WRITABLE]
                findings += [f"L1 mfn {table:#x} maps mfn {t:#x} writable but its type is {PageType(frames.type[t]).name}" for t in wrong.tolist()]
                continue
            targets = targets[targets != table]  # self-linear entries hold nothing
            np.add.at(count, targets, 1)
            np.add.at(tcount, targets, 1)
            same = targets[frames.type[targets] == level.page_type]
            linear[table] += len(same)
            np.subtract.at(linear, same, 1)
            wrong = targets[(frames.type[targets] != level.target_type) & (frames.type[targets] != level.page_type)]
            findings += [f"{level.name} mfn {table:#x} points at mfn {t:#x} of type {PageType(frames.type[t]).name}" for t in wrong.tolist()]

    for what, expected, actual in (("general count", count, frames.count), ("type count", tcount, frames.type_count), ("linear count", linear, frames.linear)):
        for mfn in np.flatnonzero(expected != actual).tolist():
            findings.append(f"mfn {mfn:#x} ({frames.describe_owner(mfn)}, {PageType(frames.type[mfn]).name}): {what} is {int(actual[mfn])}, holders account for {int(expected[mfn])}")

    free = frames.owner == NO_OWNER
    for mfn in np.flatnonzero(free & ((frames.flags != 0) | (hv.m2p != INVALID_M2P))).tolist():
        findings.append(f"free mfn {mfn:#x} has flags {int(frames.flags[mfn])} or an M2P entry")
    orphans = ~free & (frames.owner != DOMID_XEN) & ~np.isin(frames.owner, list(hv.domains))
    findings += [f"mfn {mfn:#x} is owned by dom{int(frames.owner[mfn])}, which does not exist" for mfn in np.flatnonzero(orphans).tolist()]
    unvalidated = (frames.type_count > 0) & ((frames.flags & VALIDATED) == 0) & ~partial
    findings += [f"mfn {mfn:#x} has {int(frames.type_count[mfn])} type references but is not validated" for mfn in np.flatnonzero(unvalidated).tolist()]
    untyped = (frames.type_count > 0) & (frames.type == PageType.NONE)
    findings += [f"mfn {mfn:#x} has type references but no type" for mfn in np.flatnonzero(untyped).tolist()]
    findings += [f"mfn {mfn:#x} is quarantined (scrubbed, owned by Xen, never reallocated): {why}" for mfn, why in sorted(frames.quarantined.items())]

    for domain in hv.domains.values():
        p2m = domain.p2m
        if (frames.owner[p2m] != domain.domid).any():
            findings.append(f"dom{domain.domid}: P2M names frames the domain does not own")
        if len(np.unique(p2m)) != len(p2m):
            findings.append(f"dom{domain.domid}: P2M maps two pfns to one mfn")
        expected_m2p = np.arange(len(p2m), dtype=np.uint64)
        checked = ~np.isin(p2m, list(domain.guest_m2p)) if domain.guest_m2p else np.ones(len(p2m), dtype=bool)
        for pfn in np.flatnonzero(checked & (hv.m2p[p2m] != expected_m2p)).tolist():
            findings.append(f"dom{domain.domid}: P2M says pfn {pfn:#x} is mfn {int(p2m[pfn]):#x}, M2P says that mfn is pfn {int(hv.m2p[p2m[pfn]]):#x}")
    findings += xen_slots(hv, np.flatnonzero(live & ~partial & (frames.type == PageType.L4)))
    return findings + reachability(hv) + audit_ports(hv)


def xen_slots(hv, l4s: np.ndarray) -> list[str]:
    """Every validated L4 holds Xen's own entries in slots 256..271 (init_xen_l4_slots wrote
    them at promotion, and nothing a guest can do writes them while the table is live)."""
    if not len(l4s):
        return []
    held = np.array([hv.memory.entries(l4)[XEN_SLOTS] for l4 in l4s.tolist()])
    want = np.tile(hv.pagetables.xen_l4_entries(0), (len(l4s), 1))
    want[:, L4_SLOT_LINEAR - HYPERVISOR_L4_FIRST] |= l4s.astype(np.uint64) << _SHIFT
    return [
        f"L4 mfn {int(l4s[i]):#x} slot {HYPERVISOR_L4_FIRST + j} holds {int(held[i, j]):#x}, not Xen's {int(want[i, j]):#x}"
        for i, j in zip(*(a.tolist() for a in np.nonzero(held != want)))
    ]


def reachability(hv) -> list[str]:
    """Every translation each domain's vCPUs can make reaches only frames the domain may reach.

    The roots are what a vCPU can run on or load cheaply: its kernel and user bases, the
    domain's pinned tables (each walked at its own level), and the translations its TLBs
    cache. A translation follows entries with PRESENT and USER at every level (the guest runs
    in ring 3, so Xen's own entries, which lack USER, lead nowhere); every frame it passes
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
    pinned = np.flatnonzero(frames.flags & PINNED).tolist()
    roots: list[tuple[str, int, int, int]] = []  # (label, level, mfn, owner domid)
    for domain in hv.domains.values():
        d = domain.domid
        for what, attr in (("kernel base", "guest_table"), ("user base", "guest_table_user")):
            roots += [(f"dom{d} vCPU {v.vcpu_id} {what}", 4, base, d) for v in domain.vcpus if (base := getattr(v, attr))]
    for mfn in pinned:
        level = LEVEL_OF_TYPE.get(frames.type.item(mfn))
        if level is not None and frames.owner.item(mfn) in hv.domains:
            d = frames.owner.item(mfn)
            roots.append((f"dom{d} pinned {level.name} mfn {mfn:#x}", level.level, mfn, d))
    reach = _Reach(hv)
    return reach.tables(roots) + reach.tlbs()


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
        return ok

    def what(self, mfn: int, writable: bool) -> str:
        owner = self.frames.describe_owner(mfn)
        xen = mfn < self.frames.nr_frames and self.frames.owner.item(mfn) == DOMID_XEN
        return f"{owner}, writable" if writable and xen else owner

    def tables(self, roots: list[tuple[str, int, int, int]]) -> list[str]:
        """Walk from `roots`, level 4 down to 1. A node is a (table, writable so far, domain)
        at a level; it remembers the first (parent node, slot) that reached it, which names the
        path, and its root. Bookkeeping is per table, in Python; the entries are numpy."""
        memory = self.hv.memory
        findings: list[str] = []
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
            at, index = np.nonzero((words & _P_US) == _P_US)
            entries = words[at, index]
            targets = ((entries & _MFN) >> _SHIFT).astype(np.int64)
            rw = np.array([n[1] for n in node])[at] & ((entries & _RW) != 0)
            ok = self.allowed(targets, rw, np.array([roots[n[4]][3] for n in node], np.int64)[at])
            for k in np.flatnonzero(~ok).tolist():
                mfn = int(targets[k])
                findings.append(f"{self.path(roots, nodes, level, int(at[k]), int(index[k]))} reaches mfn {mfn:#x} {self.what(mfn, bool(rw[k]))}")
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

    def tlbs(self) -> list[str]:
        """Every cached translation maps a guest address to a frame its domain may reach."""
        vcpus = [v for domain in self.hv.domains.values() for v in domain.vcpus if v.tlb.entries]
        if not vcpus:
            return []
        cached = [entry for v in vcpus for entry in v.tlb.entries.values()]
        vas = np.array([vpn for v in vcpus for vpn in v.tlb.entries], np.uint64) << _SHIFT
        mfns = np.array([e.mfn for e in cached], np.int64)
        rw = (np.array([e.flags for e in cached], np.int64) & Pte.RW) != 0
        owners = [v for v in vcpus for _ in v.tlb.entries]
        guest = (vas < np.uint64(1 << 47)) | (vas >= np.uint64(HYPERVISOR_VIRT_END))
        findings = []
        for k in np.flatnonzero(~(guest & self.allowed(mfns, rw, np.array([v.domid for v in owners], np.int64)))).tolist():
            where = "" if guest[k] else " (not a guest address)"
            findings.append(f"dom{owners[k].domid} vCPU {owners[k].vcpu_id} TLB: va {int(vas[k]):#x}{where} maps mfn {int(mfns[k]):#x} {self.what(int(mfns[k]), bool(rw[k]))}")
        return findings
