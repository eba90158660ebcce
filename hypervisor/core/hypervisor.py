"""The model's single entry point: one dispatch table for every hypercall and toolstack op.

Every call goes through `Hypervisor.hypercall` (a guest vCPU's) or `Hypervisor.toolstack`
(the admin's), which look the op up in one table, or `Hypervisor.resume` (a hypercall that
answered a `Continuation` going on, see preempt.py); this is the one place where the trace and
the statistics attach. A call returns a JSON-able result, `BLOCKED`, a `Continuation`, or
raises `XenError`.
"""

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from . import cpu, evtchn, memop, mmu, schedop, vcpuop
from .abi import (
    DOMID_FIRST_RESERVED,
    DOMID_XEN,
    HYPERVISOR_VIRT_START,
    INVALID_M2P,
    PAGE_SIZE,
    PREEMPT_WORK,
    STEP_WORK,
    VM_ASSIST_VALID,
    Errno,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_pae_extended_cr3,
)
from .domain import Domain, Vcpu, build, owned_frames, relinquish, teardown_step
from .errors import Restart, XenError
from .frames import ALLOCATED, FrameTable
from .memory import MachineMemory
from .pagetable import PageTables
from .preempt import Budget, Continuation
from .sched import BLOCKED, Scheduler, advance_time, check_running, unpark_periodic_timers, vcpu_runstate_change, vcpu_unblock

DEFAULT_FRAMES = 1 << 20  # 4 GiB of machine memory
RESERVED_FRAMES = 16  # the low frames belong to Xen, so mfn 0 never names a guest frame
MAX_DOMAINS = 256


def multicall(hv: "Hypervisor", vcpu: Vcpu, calls: list, start: int = 0, results: tuple = (), inner: Continuation | None = None) -> list[dict]:
    """HYPERVISOR_multicall (docs/xen.md section 13): run each {"op", "args"} entry, record its result,
    and go on past failures; a multicall inside a multicall fails with EINVAL. A block or poll
    that would sleep wakes at once with result 0 (a spurious wake-up, which guests allow for).

    Preemptible as do_multicall: it stops before an entry when the call's work is spent, and
    an entry that stopped part-way stops the multicall in it; going on (`start`, the `results`
    so far, that entry's continuation `inner`) finishes that entry first."""
    results = list(results)
    for i in range(start, len(calls)):
        if mmu.stop_before(hv, vcpu, i, start):
            raise Restart(start=i, results=results)
        op, args = calls[i]["op"], calls[i].get("args", {})
        try:
            if op == "multicall":
                raise XenError(Errno.EINVAL, f"multicall entry {i} is itself a multicall: do_multicall refuses reentry (xen/common/multicall.c)")
            if op not in HYPERCALLS:
                raise XenError(Errno.ENOSYS, f"unknown hypercall {op!r}")
            result = run(hv, vcpu, op, args, inner if i == start else None)
            if isinstance(result, Continuation):
                raise Restart(start=i, results=results, inner=result)
            if result is BLOCKED:
                vcpu_unblock(hv, vcpu)
                result = 0
            results.append({"result": result})
        except XenError as e:
            # The multicall itself succeeds; its failed entries are counted apart, so that a
            # report of hypercall errors shows an -EBUSY a guest met inside a batch.
            hv.count(vcpu.domid, (f"multicall/{op}", e.errno.name))
            results.append(error_result(e))
    return results


# The hypercalls that may stop part-way (do_mmu_update, do_mmuext_op, do_multicall,
# VCPUOP_initialise's arch_set_info_guest and do_memory_op's reservation ops and exchange are
# Xen's preemptible ones that the model has).
PREEMPTIBLE = frozenset({"mmu_update", "mmuext_op", "multicall", "vcpu_op", "memory_op"})


def run(hv: "Hypervisor", vcpu: Vcpu, op: str, args: dict, resumed: Continuation | None = None) -> Any:
    """Run hypercall `op`, or go on with one that stopped (`resumed`): its result, or a
    `Continuation`. A call that is over at once, as most are, makes no Continuation.

    A preemptible call first goes on tearing down what an earlier put of this vCPU left
    part-way (put_old_guest_table), runs, and is not over until that teardown is: its answer
    waits in the continuation meanwhile, as Xen passes rc through its last continuation."""
    handler = HYPERCALLS[op]
    if op not in PREEMPTIBLE:
        return handler(hv, vcpu, **args)
    if not hv.frames.put_old_guest_tables(vcpu):
        return resumed or Continuation(op, args)
    if resumed is not None and resumed.outcome is not None:
        kind, value = resumed.outcome
        if kind == "error":
            raise value
        return value
    try:
        result = handler(hv, vcpu, **args) if resumed is None else handler(hv, vcpu, **args, **resumed.at)
    except Restart as stop:
        return Continuation(op, args, stop.at)
    except XenError as e:
        if vcpu.old_guest_tables:
            return Continuation(op, args, outcome=("error", e))
        raise
    if vcpu.old_guest_tables:
        return Continuation(op, args, outcome=("result", result))
    return result


def error_result(e: XenError) -> dict:
    out = {"errno": e.errno.name, "message": e.message}
    if e.done is not None:
        out["done"] = e.done
    return out


# XENVER_* answers: the Xen release whose interfaces the simulator follows, and its own version.
XEN_VERSION = {
    "major": 4,
    "minor": 19,
    "extraversion": ".0-xensim",
    "capabilities": "xen-3.0-x86_64",
    "virt_start": HYPERVISOR_VIRT_START,
    "pagesize": PAGE_SIZE,
    "simulator": "xensim 0.1.0",
}


def xen_version(hv: "Hypervisor", vcpu: Vcpu) -> dict:
    """HYPERVISOR_xen_version: every XENVER_* query answered at once (hypercalls.proto)."""
    return dict(XEN_VERSION)


def vm_assist(hv: "Hypervisor", vcpu: Vcpu, cmd: int, type: int) -> int:
    """HYPERVISOR_vm_assist (docs/xen.md section 25; xen/common/domain.c, do_vm_assist): turn
    one assist of the caller's domain on or off. The type is checked first, against what the
    domain's address size allows (arch_vm_assist_valid_mask): EINVAL whatever the cmd; then a
    cmd other than enable or disable is ENOSYS. Nothing changes on failure."""
    domain = hv.domain(vcpu.domid)
    if type >= 64 or not VM_ASSIST_VALID[domain.address_size] >> type & 1:
        raise XenError(Errno.EINVAL, f"VMASST type {type} is not one a {domain.address_size}-bit PV dom{domain.domid} may set (arch_vm_assist_valid_mask)")
    if cmd == VMASST_CMD_enable:
        domain.vm_assist |= 1 << type
    elif cmd == VMASST_CMD_disable:
        domain.vm_assist &= ~(1 << type)
    else:
        raise XenError(Errno.ENOSYS, f"VMASST cmd {cmd} is neither enable ({VMASST_CMD_enable}) nor disable ({VMASST_CMD_disable})")
    return 0


HYPERCALLS: dict[str, Callable[..., Any]] = {
    "mmu_update": mmu.mmu_update,
    "mmuext_op": mmu.mmuext_op,
    "update_va_mapping": mmu.update_va_mapping,
    "multicall": multicall,
    "event_channel_op": evtchn.event_channel_op,
    "vcpu_op": vcpuop.vcpu_op,
    "sched_op": schedop.sched_op,
    "set_timer_op": schedop.set_timer_op,
    "xen_version": xen_version,
    "memory_op": memop.memory_op,
    "vm_assist": vm_assist,
    # The vCPU's memory path (cpu.py): load, store, atomic, read, write.
    # Their arguments and results carry bytes, which the trace writes hex-encoded.
    **cpu.HYPERCALLS,
}


class Hypervisor:
    """Machine memory, the frame table, the M2P, and every domain with its vCPUs."""

    def __init__(self, nr_frames: int = DEFAULT_FRAMES, strict_tlb: bool = False, preempt_work: int = PREEMPT_WORK):
        self.nr_frames = nr_frames
        # A stale TLB hit (cpu.py) faults instead of using the cached translation.
        self.strict_tlb = strict_tlb
        self.memory = MachineMemory(nr_frames)
        self.frames = FrameTable(nr_frames, self.memory)
        self.budget: Budget = self.frames.budget  # work per entry into the core (preempt.py)
        self.budget.per_call = preempt_work
        xen = self.frames.alloc(DOMID_XEN, RESERVED_FRAMES, xen_heap=True)
        self.pagetables = PageTables(self.frames, xen_l3=int(xen[1]), ro_mpt_l3=int(xen[2]))
        self.pagetables.high_l3_ok = self._high_l3_ok
        self.pagetables.m2p_strict = self._m2p_strict
        self.frames.forget_mappings = self._forget_mappings
        self.frames.forget_mappings_of = self._forget_mappings_of
        self.m2p = self.frames.m2p
        self.domains: dict[int, Domain] = {}
        self._next_domid = 1
        self._instances = 0  # domains ever created: the next one is instance _instances + 1
        self.tracer: Callable[[dict], None] | None = None
        self.stats: Counter = Counter()
        self.sched = Scheduler(tick=schedop.send_timer_event)  # kicks for the adapter, timers on the caller's clock

    # -- the dispatch ------------------------------------------------------------------------

    def hypercall(self, domid: int, vcpu_id: int, op: str, /, **args) -> Any:
        """Run hypercall `op` as vCPU `vcpu_id` of `domid`, which must be running (else
        `VcpuNotRunning`, see sched.check_running)."""
        return self._dispatch([domid, vcpu_id], op, args)

    def toolstack(self, op: str, /, **args) -> Any:
        """Run a toolstack (domain-control) operation."""
        return self._dispatch(None, op, args)

    def resume(self, domid: int, vcpu_id: int, continuation: Continuation) -> Any:
        """Go on with a hypercall of this vCPU that answered `continuation` (Xen's re-issued
        hypercall): its result, or a further continuation. The trace records it as its own
        call, with where it went on instead of the arguments (those are in the call's record)."""
        return self._dispatch([domid, vcpu_id], continuation.op, continuation.args, continuation)

    def _dispatch(self, caller: list | None, op: str, args: dict, resumed: Continuation | None = None) -> Any:
        record = None  # the trace's, made only while something traces
        if self.tracer:
            record = {"caller": caller, "op": op, "args": args} if resumed is None else {"caller": caller, "op": op, "resume": resumed.summary()}
        self.budget.start()
        self.budget.charge(STEP_WORK)
        try:
            if caller is None:
                handler = TOOLSTACK.get(op)
                if handler is None:
                    raise XenError(Errno.ENOSYS, f"unknown toolstack op {op!r}")
                result = handler(self, **args)
            else:
                vcpu = self.vcpu(*caller)
                check_running(self, vcpu)  # VcpuNotRunning: not a XenError, so neither counted nor traced
                if vcpu.domid in self.sched.parked:
                    unpark_periodic_timers(self, vcpu.domid)
                vcpu.continuation = None  # a vCPU that calls is no longer in a call it gave up
                handler = HYPERCALLS.get(op)
                if handler is None:
                    raise XenError(Errno.ENOSYS, f"unknown hypercall {op!r}")
                if op in PREEMPTIBLE:
                    self.frames.current = vcpu  # (de)validation may stop part-way (Restart) from here on
                    try:
                        result = run(self, vcpu, op, args, resumed)
                    finally:
                        self.frames.current = None
                    if isinstance(result, Continuation):
                        vcpu.continuation = result  # parked in the core until it goes on (trace.snapshot)
                else:
                    result = handler(self, vcpu, **args)
        except XenError as e:
            self.count(caller and caller[0], (op, e.errno.name))
            if record is not None:
                record["error"] = error_result(e)
                self.tracer(record)
            raise
        # A call counts once, when it is over. One that completed but found a bug of the
        # simulator says so in its result (destroy_domain): counted apart, as the loud outcome it is.
        if not isinstance(result, Continuation):
            self.count(caller and caller[0], (op, "bug" if isinstance(result, dict) and "bug" in result else "ok"))
        if record is not None:
            record["result"] = result
            self.tracer(record)
        return result

    def count(self, domid: int | None, key: tuple[str, str]) -> None:
        """Count a call that is over by (op, outcome): for the machine (Stats), and for the
        calling domain while it exists (DomainStats; `domid` None for a toolstack op)."""
        self.stats[key] += 1
        domain = self.domains.get(domid)
        if domain is not None:
            domain.stats[key] += 1

    def vcpu(self, domid: int, vcpu_id: int) -> Vcpu:
        domain = self.domain(domid)
        if not 0 <= vcpu_id < len(domain.vcpus):
            raise XenError(Errno.ENOENT, f"dom{domid} has no vCPU {vcpu_id}")
        return domain.vcpus[vcpu_id]

    def domain(self, domid: int) -> Domain:
        domain = self.domains.get(domid)
        if domain is None:
            raise XenError(Errno.ESRCH, f"no domain {domid}")
        return domain

    def _high_l3_ok(self, domid: int) -> bool:
        """Whether a PAE L3 of `domid` may lie above 4 GiB (promote_l3_table,
        docs/pv32.md section 3): with VMASST pae_extended_cr3, or while the toolstack builds the domain
        (before its vCPU 0 is initialised)."""
        domain = self.domains.get(domid)
        return domain is None or not domain.vcpus[0].initialised or bool(domain.vm_assist >> VMASST_TYPE_pae_extended_cr3 & 1)

    def _m2p_strict(self, domid: int) -> bool:
        domain = self.domains.get(domid)
        return domain is not None and bool(domain.vm_assist >> VMASST_TYPE_m2p_strict & 1)

    def _forget_mappings(self, mfn: int) -> None:
        """Xen's safety flush when a frame changes type: no vCPU keeps a translation to it.
        Only the owner's vCPUs can have one (nobody else may map the frame)."""
        domain = self.domains.get(self.frames.owner.item(mfn))
        if domain is not None:
            for vcpu in domain.vcpus:
                if vcpu.tlb.maps(mfn):
                    vcpu.tlb.forget_mfn(mfn)

    def _forget_mappings_of(self, mfns: np.ndarray, owner: int) -> None:
        """`_forget_mappings` of many frames of `owner` at once: each of its vCPUs checks the
        few frames its TLB maps against them."""
        domain = self.domains.get(owner)
        for vcpu in domain.vcpus if domain is not None else ():
            for mfn in vcpu.tlb.mapped(mfns):
                vcpu.tlb.forget_mfn(mfn)

    # -- toolstack ---------------------------------------------------------------------------

    def create_domain(
        self, nr_pages: int, nr_vcpus: int = 1, name: str = "", highmem_pages: int = 0, max_evtchn_port: int = evtchn.LIBXL_MAX_EVTCHN_PORT, address_size: int = 64
    ) -> dict:
        if len(self.domains) >= MAX_DOMAINS:
            raise XenError(Errno.ENOSPC, f"the machine already runs {MAX_DOMAINS} domains")
        domid = self._next_domid
        while domid in self.domains:
            domid = domid % (DOMID_FIRST_RESERVED - 1) + 1
        instance = self._instances + 1
        domain = build(self.frames, self.m2p, domid, instance, name or f"dom{domid}", nr_pages, nr_vcpus, highmem_pages, max_evtchn_port, address_size, self.pagetables.xen_l4_entries)
        if not domain.mode.pv32:
            self.pagetables.fill_ro_mpt(domain.vcpus[0].guest_table, domid)  # the toolstack's arch_set_info_guest for vCPU 0
        self.domains[domid] = domain
        for vcpu in domain.vcpus:  # vcpu_create: offline since now; vCPU 0 is scheduled at once
            vcpu.runstate.state_entry_time = self.sched.now_ns
        vcpu_runstate_change(self, domain.vcpus[0])
        self._instances = instance
        self._next_domid = domid % (DOMID_FIRST_RESERVED - 1) + 1
        return {"domid": domid, "instance": instance, "start_info": dict(domain.start_info)}

    def destroy_domain(self, domid: int) -> dict:
        """Xen's domain_kill (xen/common/domain.c): close every port (evtchn_destroy), kill
        the timers, relinquish every frame, forget the domain.

        Once the domain exists this always completes, since a half-destroyed domain helps
        nobody: every frame it owned ends scrubbed and free or, if teardown could not account
        for a reference on it (a bug of the simulator), quarantined (frames.quarantine). A bug
        found on the way does not raise after the state changed: the result says what went
        wrong under "bug", which the dispatch counts as the outcome "bug".
        """
        domain = self.domain(domid)
        problems: list[str] = []
        with teardown_step(problems, "evtchn_destroy"):
            evtchn.evtchn_destroy(self, domain)
        with teardown_step(problems, "timers"):
            self.sched.forget(domain)
        owned = owned_frames(self.frames, domain)
        problems += relinquish(self.frames, self.pagetables, domain, owned)
        del self.domains[domid]
        self.m2p[owned] = INVALID_M2P
        stranded = owned[self.frames.owner[owned] == domid]
        result = {"freed_frames": len(owned) - len(stranded), "quarantined_frames": stranded.tolist()}
        if len(stranded):
            who = f"the destruction of dom{domid} (instance {domain.instance})"
            listed = ", ".join(f"mfn {mfn:#x} ({self.frames.describe_counts(mfn)})" for mfn in stranded[:8].tolist())
            problems.append(f"frames that kept references no holder accounts for were quarantined ({len(stranded)}): {listed}{', ...' if len(stranded) > 8 else ''}")
            self.frames.quarantine(stranded, who)
        if problems:
            result["bug"] = f"dom{domid} (instance {domain.instance}) is destroyed, but its teardown found bugs of the simulator: " + "; ".join(problems)
        return result

    def pause_domain(self, domid: int) -> int:
        """xl pause: sets the flag EVTCHNOP_reset checks; the adapter holds the domain's calls.
        Its vCPUs are switched out (offline, unless blocked)."""
        return self._set_paused(domid, True)

    def unpause_domain(self, domid: int) -> int:
        return self._set_paused(domid, False)

    def _set_paused(self, domid: int, paused: bool) -> int:
        domain = self.domain(domid)
        domain.paused = paused
        for vcpu in domain.vcpus:
            vcpu_runstate_change(self, vcpu)
        return 0

    def frame_info(self, mfn: int) -> dict:
        if not 0 <= mfn < self.nr_frames:
            raise XenError(Errno.EINVAL, f"mfn {mfn:#x} is outside machine memory (0..{self.nr_frames - 1:#x})")
        info = self.frames.info(mfn)
        info["m2p"] = int(self.m2p[mfn])
        return info

    def tot_pages(self, domid: int) -> int:
        """Xen's d->tot_pages: frames the domain owns, not counting Xen-heap pages shared
        with it (shared info), which Xen keeps on a list of their own (frames.py keeps both
        counts; audit checks them)."""
        return self.frames.tot_pages.item(domid)

    def allocated_frames(self) -> int:
        return int(np.count_nonzero(self.frames.flags & ALLOCATED))

    # -- for the adapter: time in, kicks out (see sched) -------------------------------------

    def advance_time(self, now_ns: int) -> int:
        """The caller's clock reads `now_ns`: run the due timers (traced, as a toolstack op)."""
        return self.toolstack("advance_time", now_ns=now_ns)

    def next_deadline(self) -> int | None:
        """When the next timer is due (ns on the caller's clock); None if none is armed."""
        return self.sched.next_deadline()

    def take_kicks(self) -> list[tuple[int, int]]:
        """The (domid, vcpu_id) to look at since the last call: woken, kicked, up, down, or
        shut down. An upcall is then delivered by the toolstack op "deliver_upcall"."""
        return self.sched.take_kicks()


TOOLSTACK: dict[str, Callable[..., Any]] = {
    "create_domain": Hypervisor.create_domain,
    "destroy_domain": Hypervisor.destroy_domain,
    "pause_domain": Hypervisor.pause_domain,
    "unpause_domain": Hypervisor.unpause_domain,
    "advance_time": advance_time,
    "deliver_upcall": evtchn.deliver_upcall,
}
