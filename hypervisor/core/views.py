"""Read-only views of the model: what `xl`, `xl debug-keys`, `lsevtchn` and `xen-mfndump`
show on a real host, computed here so that the adapter only converts them to messages.

Nothing in this module changes the model (no count, flag, TLB or stored word moves), so a view
may be taken between any two calls without affecting what follows, and a trace replayed with
or without views reaches the same state digest.

The two views that answer "why is this frame busy" follow Xen's own bookkeeping:
`reverse_map` lists every pagetable entry in the machine whose frame field names a given mfn
(the entries `get_page_from_l1e` / `get_page_from_lNe` took references for when their table
was validated), every vCPU base pointer (`guest_table` / `guest_table_user`) on it, and its
pin; `pagetable` decodes a table's entries the way `xen-mfndump dump-ptes` does
(tools/misc/xen-mfndump.c, dump_ptes_func), adding the type and counts of each target.
"""

from collections import deque

import numpy as np

from .abi import (
    INVALID_M2P,
    PAGE_SHIFT,
    PTE_MFN_MASK,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    Errno,
    PageType,
    Pte,
)
from .domain import Domain, Vcpu, owned_frames
from .errors import XenError
from .evtchn import ECS, port_is_masked, port_is_pending, vcpu_info_words
from .evtchn import status as evtchn_status
from .frames import NO_OWNER, PAGETABLE_TYPES, PINNED, VALIDATED
from .hypervisor import XEN_VERSION, Hypervisor
from .pagetable import LEVELS

_P = np.uint64(Pte.PRESENT)
_MFN = np.uint64(PTE_MFN_MASK)
_SHIFT = np.uint64(PAGE_SHIFT)
_PAGETABLE = np.array([int(t) for t in PAGETABLE_TYPES], dtype=np.int8)


# -- the host and its domains ---------------------------------------------------------------


def host_info(hv: Hypervisor) -> dict:
    """xl info's machine part: memory, domains, the Xen version the model follows, and the
    frames destroyed domains left quarantined."""
    return {
        "nr_frames": hv.nr_frames,
        "free_frames": hv.frames.free_frames(),
        "nr_domains": len(hv.domains),
        "xen_version": f"{XEN_VERSION['major']}.{XEN_VERSION['minor']}{XEN_VERSION['extraversion']}",
        "simulator": XEN_VERSION["simulator"],
        "strict_tlb": hv.strict_tlb,
        "quarantined_frames": len(hv.frames.quarantined),
    }


def domain_state(domain: Domain) -> str:
    """xl list's state column in words: shutdown, paused, blocked (every vCPU that is up
    sleeps in SCHEDOP_block or poll) or running. Destruction is one call here, so no domain
    is ever seen dying; where Xen would keep one dying for good (a zombie whose pages kept
    references), the frames are quarantined instead, which `host_info` counts."""
    if domain.shutdown_code is not None:
        return "shutdown"
    if domain.paused:
        return "paused"
    up = [v for v in domain.vcpus if not v.down]
    return "blocked" if up and all(v.blocked for v in up) else "running"


def domain_info(hv: Hypervisor, domain: Domain) -> dict:
    """One domain as xl list -l shows it (Xen's getdomaininfo)."""
    return {
        **domain.info(),
        "tot_pages": hv.tot_pages(domain.domid),
        "nr_lowmem_pages": domain.nr_lowmem_pages,
        "shared_info_mfn": domain.shared_info_mfn,
        "state": domain_state(domain),
    }


def vcpu_info(hv: Hypervisor, domain: Domain, vcpu: Vcpu) -> dict:
    """A vCPU's state with the two bytes of its vcpu_info, in the shared-info frame or where
    VCPUOP_register_vcpu_info moved it (public/xen.h struct vcpu_info: evtchn_upcall_pending,
    evtchn_upcall_mask), its periodic timer's period and its vcpu_info's place."""
    mfn, index = vcpu_info_words(hv, vcpu)
    info = hv.memory.read(mfn, 8 * index, VCPU_INFO_SIZE)
    return {
        **vcpu.info(),
        "upcall_pending": bool(info[VCPU_INFO_UPCALL_PENDING]),
        "upcall_mask": bool(info[VCPU_INFO_UPCALL_MASK]),
        "periodic_period_ns": vcpu.periodic_period,
        "vcpu_info_mfn": mfn if vcpu.vcpu_info_area is not None else 0,
        "vcpu_info_offset": 8 * index if vcpu.vcpu_info_area is not None else 0,
    }


def evtchn_ports(hv: Hypervisor, domain: Domain) -> list[dict]:
    """Every port that is not free or reserved, as Xen's debug key 'e' prints it
    (xen/common/event_channel.c, domain_dump_evtchn_info): EVTCHNOP_status's answer and the
    port's pending and mask bits, in shared_info.evtchn_pending / evtchn_mask or, under FIFO,
    its event word (evtchn_port_is_pending, evtchn_port_is_masked)."""
    ports = []
    for port, chn in enumerate(domain.evtchn):
        if chn.state in (ECS.FREE, ECS.RESERVED):
            continue
        ports.append(
            {
                "port": port,
                "status": evtchn_status(hv, domain.vcpus[0], port),
                "pending": port_is_pending(hv, domain, port),
                "masked": port_is_masked(hv, domain, port),
            }
        )
    return ports


def domain_summary(hv: Hypervisor, domain: Domain) -> dict:
    """Debug key 'q' condensed (xen/arch/x86/mm.c and common/keyhandler.c dump a domain's
    page list): the domain's frames counted by type, its pagetables that are validated and
    pinned, and its writable mappings (writable type references on its data frames). Reads
    the domain's own frames only (domain.owned_frames)."""
    frames = hv.frames
    owned = owned_frames(frames, domain)
    types = frames.type[owned]
    flags = frames.flags[owned]
    tables = np.isin(types, _PAGETABLE)
    writable = owned[types == PageType.WRITABLE]
    by_type = np.bincount(types, minlength=len(PageType))
    return {
        "frames": len(owned),
        "by_type": {PageType(t).name: int(n) for t, n in enumerate(by_type.tolist()) if n},
        "pagetables": int(np.count_nonzero(tables)),
        "validated_pagetables": int(np.count_nonzero(tables & ((flags & VALIDATED) != 0))),
        "pinned_pagetables": int(np.count_nonzero(tables & ((flags & PINNED) != 0))),
        "writable_mappings": int(frames.type_count[writable].sum()),
        "writable_frames": int(np.count_nonzero(frames.type_count[writable])),
    }


def domain_stats(hv: Hypervisor, domid: int | None = None) -> list[tuple[int, str, str, int]]:
    """(domid, op, outcome, count) of every domain's calls, or of one domain's, sorted: what
    xentop shows per domain. Counted by the core as it runs them (Hypervisor.count), so a
    replayed trace gives the same answer; a domain that does not exist has none."""
    domains = hv.domains.values() if domid is None else [hv.domains[domid]] if domid in hv.domains else []
    return sorted((d.domid, op, outcome, n) for d in domains for (op, outcome), n in d.stats.items())


# -- memory maps ----------------------------------------------------------------------------


def p2m(hv: Hypervisor, domain: Domain) -> list[int]:
    """The domain's pfn -> mfn map as the builder assigned it (xen-mfndump dump-p2m)."""
    return domain.p2m.tolist()


def m2p(hv: Hypervisor, domid: int | None = None) -> list[tuple[int, int, int]]:
    """(mfn, owner, M2P entry) of every owned frame, or of one domain's (xen-mfndump
    dump-m2p); INVALID_M2P marks a frame with none."""
    owner = hv.frames.owner
    mfns = np.flatnonzero(owner != NO_OWNER if domid is None else owner == domid)
    return list(zip(mfns.tolist(), owner[mfns].tolist(), hv.m2p[mfns].tolist()))


def _check_mfn(hv: Hypervisor, mfn: int) -> None:
    if not 0 <= mfn < hv.nr_frames:
        raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is outside machine memory (0..{hv.nr_frames - 1:#x})")


def _target(hv: Hypervisor, mfn: int) -> dict:
    """What an entry points at, for a reader: its frame-table entry and the pfn the M2P
    gives it (None when the mfn lies outside machine memory or has no M2P entry)."""
    if not 0 <= mfn < hv.nr_frames:
        return {"mfn": mfn, "pfn": None, "frame": None}
    pfn = int(hv.m2p[mfn])
    return {"mfn": mfn, "pfn": None if pfn == INVALID_M2P else pfn, "frame": hv.frame_info(mfn)}


def pagetable(hv: Hypervisor, mfn: int) -> dict:
    """A pagetable frame and its present entries decoded: slot, raw entry, target and the
    target's frame-table entry. EINVAL if the frame has no pagetable type (a frame keeps its
    type after devalidation, so a table no longer in use can still be read; its entries then
    hold no references, which `frame.validated` shows)."""
    _check_mfn(hv, mfn)
    kind = hv.frames.type.item(mfn)
    if kind not in _PAGETABLE:
        raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is not a pagetable (type {PageType(kind).name})")
    level = hv.pagetables.level_of(mfn, kind)  # the owner's mode's row: a PAE_XEN_L2's top slots are Xen's
    words = hv.memory.entries(mfn)
    entries = []
    for slot in np.flatnonzero((words & _P) != 0).tolist():
        entry = words.item(slot)
        entries.append({"slot": slot, "entry": entry, "xen_slot": not level.guest_slots[slot], **_target(hv, (entry & PTE_MFN_MASK) >> PAGE_SHIFT)})
    return {"level": level.level, "frame": hv.frame_info(mfn), "entries": entries, "address_size": hv.pagetables.mode(hv.frames.owner.item(mfn)).address_size}


def pagetable_tree(hv: Hypervisor, root: int) -> list[dict]:
    """`pagetable` of `root` and of every table below it, each once, parents before
    children: the L4's guest entries lead to L3s, theirs to L2s and so on. Entries in Xen's
    slots (the linear map) and entries naming a frame of another level or outside memory are
    not followed, so a linear or cyclic entry cannot loop."""
    seen, order, queue = {root}, [], deque([root])
    while queue:
        table = pagetable(hv, queue.popleft())
        order.append(table)
        if table["level"] == 1:
            continue
        want = LEVELS[table["level"] - 1].page_type.name
        for entry in table["entries"]:
            child = entry["mfn"]
            if not entry["xen_slot"] and entry["frame"] and entry["frame"]["type"] == want and child not in seen:
                seen.add(child)
                queue.append(child)
    return order


def reverse_map(hv: Hypervisor, mfn: int) -> dict:
    """Everything in the machine that refers to frame `mfn`: its frame-table entry, every
    present entry of every frame typed as a pagetable whose frame field is `mfn` (with
    whether it holds a reference now: its table is validated and in use, and it is a guest
    slot and not a self-reference), every vCPU base pointer on it, and its pin.

    The scan covers each pagetable frame's 512 words at once; frames with no pagetable type
    are data and are not read."""
    _check_mfn(hv, mfn)
    frames = hv.frames
    tables = np.flatnonzero(np.isin(frames.type, _PAGETABLE) & (frames.owner != NO_OWNER))
    entries = []
    for table in tables.tolist():
        words = hv.memory.entries(table)
        slots = np.flatnonzero(((words & _P) != 0) & (((words & _MFN) >> _SHIFT) == mfn))
        if not len(slots):
            continue
        level = hv.pagetables.level_of(table, frames.type.item(table))
        live = frames.locked_type(table) is not None
        for slot in slots.tolist():
            guest = bool(level.guest_slots[slot])
            entries.append(
                {
                    "table": table,
                    "level": level.level,
                    "slot": slot,
                    "entry": words.item(slot),
                    "owner": frames.owner.item(table),
                    "holds_reference": live and guest and not (level.level > 1 and table == mfn),
                    "xen_slot": not guest,
                    "address_size": hv.pagetables.mode(frames.owner.item(table)).address_size,
                }
            )
    bases = [
        {"domid": domain.domid, "vcpu": vcpu.vcpu_id, "user": user}
        for domain in hv.domains.values()
        for vcpu in domain.vcpus
        for user, base in ((False, vcpu.guest_table), (True, vcpu.guest_table_user))
        if base == mfn
    ]
    return {"frame": hv.frame_info(mfn), "entries": entries, "bases": bases}
