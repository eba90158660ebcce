"""HYPERVISOR_memory_op (docs/xen.md section 23): a domain's memory reservation, as
xen/common/memory.c's do_memory_op answers a 64-bit PV guest.

Theory of operation. A PV guest is not translated: its "gmfn" is the machine frame itself, Xen
keeps no P2M for it, and the guest's own P2M (its mfn list) is the guest's to update. Giving a
frame back (decrease_reservation, guest_remove_page) drops the frame's allocation reference:
the frame is freed (scrubbed, its M2P entry invalid) when its last reference goes, which may be
later, if the guest still maps, pins or runs on it; Xen does not refuse. Taking frames
(increase_reservation, populate_physmap) allocates extents of 2**extent_order contiguous frames
within the domain's max_pages; populate_physmap also sets their M2P entries to the pfns the guest
named (guest_physmap_add_page). memory_exchange trades frames the domain holds only by their
allocation reference for new ones, chunk by chunk, each chunk all or nothing.

The reservation ops answer a count, never an errno: Xen stops at the first extent it cannot do
(`goto out`) and returns how many it did, and an argument it refuses (a foreign domain without
privilege, an order too large, an extent list too short) answers the count it started from.
xensim adds why it stopped (`stopped`, Xen's gdprintk), which Xen does not return. The extent
lists are the call's own (the wire carries them, as mmu_update's requests): the answer carries
the list as Xen leaves it in guest memory, with each allocated extent's first mfn written in.

Long calls are preemptible as in Xen (hypercall_preempt_check before every extent but the
first; preempt.py): the call stops with its progress (`start`, the list so far in `out`) and
goes on where it stopped, as Xen's continuation re-issues memory_op with the done count in
`cmd` (MEMOP_EXTENT_SHIFT) or with nr_exchanged written back to the guest. A guest names no
start of its own: the nr_exchanged it passes is checked (XSA-212) and is where it goes on.
"""

from typing import TYPE_CHECKING

import numpy as np

from .abi import DOMID_SELF, INVALID_M2P, INVALID_MFN, PAGE_SHIFT, STEP_WORK, Errno, XENMEMF_populate_on_demand
from .errors import Restart, XenError
from .frames import ALLOCATED, XEN_HEAP
from .mmu import stop_before

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .hypervisor import Hypervisor

MEMOP_EXTENT_SHIFT = 6  # the done count rides in cmd's high bits, so nr_extents has to fit there
MAX_EXTENTS = 0xFFFFFFFF >> MEMOP_EXTENT_SHIFT
# max_order (xen/common/memory.c): CONFIG_DOMU_MAX_ORDER is PAGETABLE_ORDER and
# CONFIG_HWDOM_MAX_ORDER 12 on x86 (xen/arch/x86/include/asm/config.h); MAX_ORDER bounds
# populate-on-demand.
DOMU_MAX_ORDER = 9
HWDOM_MAX_ORDER = 12
MAX_ORDER = 18


def memory_op(hv: "Hypervisor", vcpu: "Vcpu", cmd: str | int, start: int | None = None, out: list | None = None, **fields) -> dict:
    """HYPERVISOR_memory_op(cmd, arg): `cmd` names the XENMEM_* op (a key of XENMEM, or a
    number without one: ENOSYS, as arch_memory_op answers), `fields` its argument. Every op
    answers a dict whose "result" is Xen's return value. `start` and `out` are set only by
    Hypervisor.resume, where a preempted call goes on."""
    handler = XENMEM.get(cmd)
    if handler is None:
        raise XenError(Errno.ENOSYS, f"unknown memory_op {cmd!r} (xensim has {', '.join(XENMEM)})")
    caller = hv.domains[vcpu.domid]
    if start is not None:
        fields.update(start=start, out=out)
    return handler(hv, vcpu, caller, **fields)


# -- helpers ----------------------------------------------------------------------------------


def max_order(domain: "Domain") -> int:
    """xen/common/memory.c max_order: the largest extent a domain may ask for."""
    return HWDOM_MAX_ORDER if domain.privileged else DOMU_MAX_ORDER


def _target(hv: "Hypervisor", caller: "Domain", domid: int) -> "Domain | None":
    """rcu_lock_domain_by_any_id: DOMID_SELF or any existing domain's id, the caller's own
    included; None if there is none."""
    return caller if domid == DOMID_SELF else hv.domains.get(domid)


def _may_act_on(caller: "Domain", target: "Domain") -> bool:
    """The XSM dummy policy's XSM_TARGET: a domain acts on itself, a privileged one on any."""
    return target is caller or caller.privileged


def _address_limit(hv: "Hypervisor", mem_flags: int) -> int | None:
    """The frames an allocation may use under XENMEMF_address_bits (construct_memop_from_reservation):
    all of them when the bits are 0 or cover the machine; None when they are too few (EINVAL)."""
    bits = mem_flags & 0xFF
    if not bits or bits >= (hv.nr_frames - 1).bit_length() + PAGE_SHIFT:
        return hv.nr_frames
    if bits <= PAGE_SHIFT:
        return None
    return 1 << (bits - PAGE_SHIFT)


def _forget_pfns(domain: "Domain", mfns: np.ndarray) -> None:
    """The builder's P2M (Domain.p2m, audit's reference) no longer names frames given back."""
    domain.p2m[np.isin(domain.p2m, mfns)] = INVALID_MFN


def _add_to_physmap(hv: "Hypervisor", domain: "Domain", extent: np.ndarray, gpfn: int) -> None:
    """guest_physmap_add_page for a PV guest (xen/arch/x86/mm/physmap.c): M2P[mfn + j] =
    gpfn + j, nothing else (the guest keeps its own P2M). Where the pfn is one the builder's
    P2M has no frame for, it records the new frame there, for audit; else the M2P entry is the
    guest's own (Domain.guest_m2p)."""
    pfns = (np.arange(len(extent), dtype=np.uint64) + np.uint64(gpfn & INVALID_M2P)) & np.uint64(INVALID_M2P)
    hv.frames.m2p[extent] = pfns
    inside = pfns < len(domain.p2m)
    mine = np.zeros(len(extent), dtype=bool)
    mine[inside] = domain.p2m[pfns[inside].astype(np.int64)] == INVALID_MFN
    domain.p2m[pfns[mine].astype(np.int64)] = extent[mine]
    domain.guest_m2p.update(extent[~mine].tolist())


def _stopped(done: int, message: str) -> dict:
    return {"result": done, "stopped": message}


def _compat_unreadable(caller: "Domain", extent_start: list, nr_extents: int) -> str | None:
    """A 32-bit guest's extent list holds compat_pfn_t, u32 (xen/common/compat/memory.c): an
    entry that does not fit is one it cannot have written, refused as Xen refuses a list it
    cannot read (docs/pv32.md section 11); None if the list is readable."""
    if caller.address_size == 32 and not caller.abi.fits(max(extent_start[:nr_extents], default=0)):
        return f"an entry of dom{caller.domid}'s extent list does not fit a 32-bit guest's compat_pfn_t (compat_handle_okay)"
    return None


def _check_reservation(hv, caller, extent_start: list, nr_extents: int, extent_order: int, mem_flags: int, domid: int, null_ok: bool, pod: bool = False, reads: bool = True):
    """do_memory_op's checks before a reservation op runs, each answered by the count it
    started from (Xen returns start_extent): the target domain and its limit, or the reason.
    `reads`: the op reads the list's entries (all but increase_reservation)."""
    if nr_extents > MAX_EXTENTS:
        return f"nr_extents {nr_extents} exceeds {MAX_EXTENTS} (it could not ride in a continuation)"
    target = _target(hv, caller, domid)
    if target is None:
        return f"no domain {domid}"
    if len(extent_start) < nr_extents and not (null_ok and not extent_start):
        return f"the extent list has {len(extent_start)} entries, not {nr_extents} (guest_handle_subrange_okay)"
    unreadable = _compat_unreadable(caller, extent_start, nr_extents) if reads else None
    if unreadable:
        return unreadable
    below = _address_limit(hv, mem_flags)
    if below is None:
        return f"address bits {mem_flags & 0xFF} leave no frame (at most {PAGE_SHIFT})"
    if not _may_act_on(caller, target):
        return f"dom{caller.domid} may not adjust the reservation of dom{target.domid} (xsm_memory_adjust_reservation)"
    limit = MAX_ORDER if pod else max_order(caller)
    if extent_order > limit:
        return f"extent order {extent_order} exceeds {limit} for dom{caller.domid}"
    return target, below


# -- XENMEM_increase_reservation, populate_physmap, decrease_reservation ---------------------------


def increase_reservation(hv, vcpu, caller, extent_start=(), nr_extents=0, extent_order=0, mem_flags=0, domid=DOMID_SELF, start=0, out=None) -> dict:
    """Allocate nr_extents extents to the domain; with an extent list, each one's first mfn is
    written into it (an empty list is Xen's null handle: nothing is written)."""
    return _allocate(hv, vcpu, caller, list(extent_start), nr_extents, extent_order, mem_flags, domid, start, out, populate=False)


def populate_physmap(hv, vcpu, caller, extent_start=(), nr_extents=0, extent_order=0, mem_flags=0, domid=DOMID_SELF, start=0, out=None) -> dict:
    """Allocate an extent for each pfn of the list, set the M2P of its frames to that pfn and
    the following ones, and write its first mfn over the pfn."""
    return _allocate(hv, vcpu, caller, list(extent_start), nr_extents, extent_order, mem_flags, domid, start, out, populate=True)


def _allocate(hv, vcpu, caller, extent_start, nr_extents, extent_order, mem_flags, domid, start, out, populate: bool) -> dict:
    pod = populate and bool(mem_flags & XENMEMF_populate_on_demand)
    checked = _check_reservation(hv, caller, extent_start, nr_extents, extent_order, mem_flags, domid, null_ok=not populate, pod=pod, reads=populate)
    listed = out if out is not None else extent_start
    if isinstance(checked, str):
        return {**_stopped(start, checked), "extent_start": listed}
    target, below = checked
    if pod and target is caller:
        return {**_stopped(start, "populate-on-demand on oneself"), "extent_start": listed}
    listed = list(listed)
    size = 1 << extent_order
    tot = hv.tot_pages(target.domid)
    for i in range(start, nr_extents):
        if stop_before(hv, vcpu, i, start):
            raise Restart(start=i, out=listed)
        if pod:
            continue  # PV: populate-on-demand marks nothing (is_hvm_domain fails), the extent counts as done
        if tot + size > target.max_pages:
            return {**_stopped(i, f"E2BIG: dom{target.domid} holds {tot} of its {target.max_pages} pages, an extent of {size} does not fit (assign_pages)"), "extent_start": listed}
        extent = hv.frames.alloc_extent(target.domid, extent_order, below)
        if extent is None:
            return {**_stopped(i, f"ENOMEM: no free extent of order {extent_order} below mfn {below:#x}"), "extent_start": listed}
        tot += size
        if populate:
            _add_to_physmap(hv, target, extent, listed[i])
        if listed:
            listed[i] = int(extent[0])
    return {"result": nr_extents, "stopped": "", "extent_start": listed}


def decrease_reservation(hv, vcpu, caller, extent_start=(), nr_extents=0, extent_order=0, mem_flags=0, domid=DOMID_SELF, start=0, out=None) -> dict:
    """Give back each extent of the list: guest_remove_page on each of its frames, stopping at
    the first that fails (the extent's frames before it stay given back, as in Xen)."""
    extent_start = list(extent_start)
    checked = _check_reservation(hv, caller, extent_start, nr_extents, extent_order, mem_flags, domid, null_ok=False)
    if isinstance(checked, str):
        return {**_stopped(start, checked), "extent_start": extent_start}
    target, _ = checked
    for i in range(start, nr_extents):
        if stop_before(hv, vcpu, i, start):
            raise Restart(start=i, out=extent_start)
        for j in range(1 << extent_order):
            gmfn = (extent_start[i] + j) & INVALID_M2P
            try:
                guest_remove_page(hv, target, gmfn)
            except XenError as e:
                return {**_stopped(i, f"{e.errno.name}: extent {i} frame {j}: {e.message}"), "extent_start": extent_start}
    return {"result": nr_extents, "stopped": "", "extent_start": extent_start}


def guest_remove_page(hv: "Hypervisor", domain: "Domain", mfn: int) -> None:
    """xen/common/memory.c guest_remove_page for a PV guest (gmfn = mfn): drop the frame's
    allocation reference; it is freed when its last reference goes (put_page_alloc_ref)."""
    frames = hv.frames
    if not 0 <= mfn < frames.nr_frames:
        raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is outside machine memory (mfn_valid)")
    if not frames.get_page(mfn, domain.domid):
        raise XenError(Errno.ENXIO, f"mfn {mfn:#x} is {frames.describe_owner(mfn)}, not dom{domain.domid} (get_page)")
    if frames.flags.item(mfn) & XEN_HEAP:
        frames.put_page(mfn)
        raise XenError(Errno.ENXIO, f"mfn {mfn:#x} is a Xen-heap page shared with dom{domain.domid} (xensim keeps it: docs/deviations.md)")
    frames.budget.charge(STEP_WORK)
    if frames.flags.item(mfn) & ALLOCATED:
        _forget_pfns(domain, np.array([mfn]))
        frames.flags[mfn] &= ~np.uint8(ALLOCATED)
        frames.put_page(mfn)  # the allocation reference: not the last, ours is held
    frames.put_page(mfn)


# -- XENMEM_exchange ------------------------------------------------------------------------------


def exchange(hv, vcpu, caller, input: dict, output: dict, nr_exchanged: int = 0, start=None, out=None) -> dict:  # noqa: A002 - Xen's field names are in/out
    """memory_exchange: trade the input extents (frames the domain holds only by their
    allocation reference) for new extents of output.extent_order, chunk by chunk; each new
    extent's M2P is set to the pfn the output list names, and its first mfn written there.
    `nr_exchanged` is how far an earlier call got, checked as Xen checks it (XSA-212)."""
    done = nr_exchanged if start is None else start
    ins, outs = _reservation(input), _reservation(output)
    listed = list(outs["extent_start"]) if out is None else list(out)

    def fail(errno: Errno, message: str, at: int = done) -> XenError:
        return XenError(errno, f"XENMEM_exchange: {message}", done=at)

    if max(ins["extent_order"], outs["extent_order"]) > max_order(caller):
        raise fail(Errno.EPERM, f"extent orders {ins['extent_order']} and {outs['extent_order']}: at most {max_order(caller)} for dom{caller.domid}")
    n_in, n_out = ins["nr_extents"], outs["nr_extents"]
    if done > n_in:
        raise fail(Errno.EINVAL, f"nr_exchanged {done} exceeds the {n_in} input extents")
    if ins["domid"] != outs["domid"]:
        raise fail(Errno.EINVAL, f"input domain {ins['domid']} and output domain {outs['domid']} differ")
    if n_in << ins["extent_order"] != n_out << outs["extent_order"]:
        raise fail(Errno.EINVAL, f"{n_in} extents of order {ins['extent_order']} are not {n_out} extents of order {outs['extent_order']}")
    if done == n_in:
        return {"result": 0, "nr_exchanged": done, "extent_start": listed}
    if len(ins["extent_start"]) < n_in or len(listed) < n_out:
        raise fail(Errno.EFAULT, f"the extent lists have {len(ins['extent_start'])} and {len(listed)} entries, not {n_in} and {n_out} (guest_handle_subrange_okay)")
    unreadable = _compat_unreadable(caller, ins["extent_start"], n_in) or _compat_unreadable(caller, listed, n_out)
    if unreadable:
        raise fail(Errno.EFAULT, unreadable)
    below = _address_limit(hv, outs["mem_flags"])
    if below is None:
        raise fail(Errno.EINVAL, f"output address bits {outs['mem_flags'] & 0xFF} leave no frame")
    target = _target(hv, caller, ins["domid"])
    if target is None:
        raise fail(Errno.ESRCH, f"no domain {ins['domid']}")
    if not _may_act_on(caller, target):
        raise fail(Errno.EPERM, f"dom{caller.domid} may not exchange the memory of dom{target.domid} (xsm_memory_exchange)")
    in_chunk = max(outs["extent_order"] - ins["extent_order"], 0)  # input extents per chunk, as a shift
    out_chunk = max(ins["extent_order"] - outs["extent_order"], 0)
    first = done >> in_chunk
    for i in range(first, n_in >> in_chunk):
        if stop_before(hv, vcpu, i, first):
            raise Restart(start=i << in_chunk, out=listed)
        gmfns = ins["extent_start"][i << in_chunk : (i + 1) << in_chunk]
        try:
            _exchange_chunk(hv, target, gmfns, ins["extent_order"], listed, i << out_chunk, 1 << out_chunk, outs["extent_order"], below)
        except XenError as e:
            raise fail(e.errno, f"chunk {i}: {e.message}", i << in_chunk) from None
    return {"result": 0, "nr_exchanged": n_in, "extent_start": listed}


def _reservation(fields: dict) -> dict:
    return {"extent_start": [], "nr_extents": 0, "extent_order": 0, "mem_flags": 0, "domid": DOMID_SELF, **fields}


def _exchange_chunk(hv, domain: "Domain", gmfns: list, in_order: int, listed: list, first_out: int, nr_out: int, out_order: int, below: int) -> None:
    """One chunk: steal every input frame, allocate every output extent, and only then free
    the one and assign the other; a failure before that changes nothing (Xen puts the stolen
    frames back, and frees the extents it got)."""
    frames = hv.frames
    stolen = [(gmfn + k) & INVALID_M2P for gmfn in gmfns for k in range(1 << in_order)]
    for mfn in stolen:
        if not 0 <= mfn < frames.nr_frames:
            raise XenError(Errno.EINVAL, f"input mfn {mfn:#x} is outside machine memory (mfn_valid)")
        if frames.owner.item(mfn) != domain.domid or frames.flags.item(mfn) & XEN_HEAP or frames.count.item(mfn) != 1 or not frames.flags.item(mfn) & ALLOCATED:
            held = f"{frames.describe_owner(mfn)} with count {frames.count.item(mfn)}"
            raise XenError(Errno.EINVAL, f"input mfn {mfn:#x} is {held}: only a frame of dom{domain.domid} held by its allocation alone can be stolen (steal_page)")
    if len(set(stolen)) != len(stolen):
        raise XenError(Errno.EINVAL, "an input frame is named twice (steal_page finds it stolen already)")
    extents = []
    try:
        for _ in range(nr_out):
            extent = frames.alloc_extent(domain.domid, out_order, below)
            if extent is None:
                raise XenError(Errno.ENOMEM, f"no free extent of order {out_order} below mfn {below:#x}")
            extents.append(extent)
    except XenError:
        for extent in extents:
            frames.release(extent)
        raise
    _forget_pfns(domain, np.array(stolen, dtype=np.int64))
    for mfn in stolen:  # the allocation reference was the only one: freed and scrubbed
        frames.flags[mfn] &= ~np.uint8(ALLOCATED)
        frames.put_page(mfn)
    frames.budget.charge(STEP_WORK * (len(stolen) + nr_out))
    for j, extent in enumerate(extents):
        _add_to_physmap(hv, domain, extent, listed[first_out + j])
        listed[first_out + j] = int(extent[0])


# -- XENMEM_current_reservation, maximum_reservation, maximum_ram_page ---------------------------


def _stat(hv, caller, domid: int, what: str) -> "Domain":
    target = _target(hv, caller, domid)
    if target is None:
        raise XenError(Errno.ESRCH, f"XENMEM_{what}: no domain {domid}")
    if not _may_act_on(caller, target):
        raise XenError(Errno.EPERM, f"XENMEM_{what}: dom{caller.domid} may not read the reservation of dom{target.domid} (xsm_memory_stat_reservation)")
    return target


def current_reservation(hv, vcpu, caller, domid: int = DOMID_SELF) -> dict:
    """domain_tot_pages: the frames the domain holds (not the Xen-heap page shared with it)."""
    return {"result": hv.tot_pages(_stat(hv, caller, domid, "current_reservation").domid)}


def maximum_reservation(hv, vcpu, caller, domid: int = DOMID_SELF) -> dict:
    """d->max_pages."""
    return {"result": _stat(hv, caller, domid, "maximum_reservation").max_pages}


def maximum_ram_page(hv, vcpu, caller) -> dict:
    """max_page: one past the highest machine frame of RAM."""
    return {"result": hv.nr_frames}


XENMEM = {
    "increase_reservation": increase_reservation,
    "decrease_reservation": decrease_reservation,
    "maximum_ram_page": maximum_ram_page,
    "current_reservation": current_reservation,
    "maximum_reservation": maximum_reservation,
    "populate_physmap": populate_physmap,
    "exchange": exchange,
}
