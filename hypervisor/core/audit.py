"""Audit: recompute every reference from first principles and report each mismatch.

This is Xen 3.0's audit.c (section 12.5) over the holder table of section 12.1: starting from
nothing, add one general reference for each allocation, pin, vCPU base pointer and present
entry of a validated table, and one type reference for each pin, base pointer, upper-level
entry and writable L1 entry (a partial table holds what frames.py says: its entries below
nr_validated, a general reference for its PARTIAL_SET entry, and both kinds on itself; a
vCPU's old_guest_tables hold a general reference each); then every frame's counts must equal
what the frame table says, along with the invariants of section 12.2 and P2M/M2P agreement,
then the event-channel port tables (`evtchn.audit`). A healthy model has no findings.
"""

import numpy as np

from .abi import DOMID_XEN, PAGE_SHIFT, PTE_MFN_MASK, PageType, Pte
from .domain import INVALID_M2P
from .evtchn import audit as audit_ports
from .frames import ALLOCATED, NO_OWNER, PARTIAL, PARTIAL_SET, PINNED, VALIDATED, XEN_HEAP
from .pagetable import LEVELS

_P, _RW = np.uint64(Pte.PRESENT), np.uint64(Pte.RW)
_MFN = np.uint64(PTE_MFN_MASK)


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
                    count[int((words[held] & _MFN) >> np.uint64(PAGE_SHIFT))] += 1
                present &= slot_index < held
            entries = words[present]
            targets = ((entries & _MFN) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
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
    return findings + audit_ports(hv)
