"""The guest's typed hypercall client: every hypercall and memory access of the contract.

A Session message costs ~300-600 us here and a call inside one ~1 us (docs/transport.md section 2.4), so
calls are values that can be sent one per message or many per message. Each method of
`Hypercalls` builds an `Op` (the wire `Call` and how to read its result) and hands it to
`_issue`, which decides what issuing means: the base class returns the Op (for `submit` or a
multicall), `HypercallClient` sends it and returns its result, a `Batch` queues it for one
message and returns a `Pending`, and a multicall batch (multicall.py) queues it as a
multicall entry. So each call is written once.

Results follow the contract's error model (common.proto): a Xen errno raises `XenError`, a
malformed call raises `CallRejected`, and a page fault of a memory access is a `PageFault`
value, because what a fault means is the guest kernel's business.
"""

import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import trio
from google.rpc import error_details_pb2, status_pb2

from xensim.v1 import hypercalls_pb2, memory_pb2

from .transport import Session, SessionClosed, open_session
from .xen import UVMF_NONE, Errno, MmuextCmd, VGCF_in_kernel

MAX_CALLS_PER_MESSAGE = 1024  # hypercalls.proto SessionRequest.calls
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class XenError(Exception):
    """A hypercall Xen refused: its errno (an `Errno`, so both name and number), Xen's message
    naming the rule that broke, and for a batched call the failing entry's `index` and Xen's
    `done` count (entries completed before it)."""

    def __init__(self, errno: Errno, message: str, index: int | None = None, done: int | None = None, hypercall: str = ""):
        super().__init__(errno, message, index, done, hypercall)
        self.errno, self.message, self.index, self.done, self.hypercall = errno, message, index, done, hypercall

    def __str__(self) -> str:
        where = f" [{self.hypercall} entry {self.index}, {self.done} done]" if self.index is not None else ""
        return f"{self.errno.name} ({self.errno.value}): {self.message}{where}"


class CallRejected(Exception):
    """The hypervisor refused a call without running it (INVALID_ARGUMENT for a malformed call,
    naming the field): a bug of the guest, never a Xen outcome."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class CallSkipped(Exception):
    """stop_on_error stopped the message at an earlier call, so this one never ran."""


@dataclass(frozen=True)
class PageFault:
    """A memory access that faulted (#PF): cr2, the x86 error code (P 1, W 2, U 4, RSVD 8) and
    the hypervisor's account of which entry failed. The access had no effect."""

    address: int
    error_code: int
    detail: str = ""


def status_error(status: status_pb2.Status) -> Exception:
    """The exception a google.rpc.Status stands for: XenError when Xen's ErrorInfo is in its
    details, CallRejected otherwise."""
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == "xen":
                errno = Errno(int(info.metadata["errno"]))
                index, done = (int(info.metadata[key]) if key in info.metadata else None for key in ("index", "done"))
                message = status.message.removeprefix(f"{errno.name} ({errno.value}): ")
                return XenError(errno, message, index, done, info.metadata.get("hypercall", ""))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"{v.field}: {v.description}" for v in bad.field_violations]
    extra = [v for v in violations if v not in status.message]  # the server's text may name them already
    return CallRejected(_STATUS_CODES[status.code], "; ".join([status.message, *extra]))


class Op(NamedTuple):
    """One call as a value: the case of the wire `Call` oneof, its request message, and how to
    turn a successful `CallResult` into the guest's value."""

    kind: str
    request: Any
    decode: Callable[[hypercalls_pb2.CallResult], Any]

    def call(self) -> hypercalls_pb2.Call:
        return hypercalls_pb2.Call(**{self.kind: self.request})


_SKIPPED = object()


class Pending:
    """The outcome of a queued call, known once its batch has been issued: `result()` returns
    the call's value or raises its XenError, CallRejected or CallSkipped."""

    __slots__ = ("op", "_result")

    def __init__(self, op: Op, result: hypercalls_pb2.CallResult | None = None):
        self.op, self._result = op, result

    def exception(self) -> Exception | None:
        """What result() would raise (XenError, CallRejected, CallSkipped), or None."""
        if self._result is None:
            raise RuntimeError(f"{self.op.kind} has not been issued yet (still in its batch)")
        if self._result is _SKIPPED:
            return CallSkipped(f"{self.op.kind} did not run: stop_on_error stopped its message at an earlier call")
        return status_error(self._result.status) if self._result.HasField("status") else None

    def result(self) -> Any:
        error = self.exception()
        if error is not None:
            raise error
        return self.op.decode(self._result)


# -- decoders: a successful CallResult -> the guest's value -----------------------------------


def _nothing(result) -> None:
    return None


def _fault(outcome) -> PageFault:
    return PageFault(outcome.fault.address, outcome.fault.error_code, outcome.fault.detail)


def _faulted_or(field: str | None) -> Callable:
    """Decoder of a memory access: its PageFault, or else its `field` (None for none)."""

    def decode(result):
        outcome = getattr(result, result.WhichOneof("result"))
        if outcome.HasField("fault"):
            return _fault(outcome)
        return getattr(outcome, field) if field else None

    return decode


def _field(*path: str) -> Callable:
    def decode(result):
        for name in path:
            result = getattr(result, name)
        return result

    return decode


class Hypercalls:
    """Every call a guest vCPU can make, each building an `Op` and handing it to `_issue`.

    Domain arguments left at None mean DOMID_SELF (the wire's unset `optional`). Batched calls
    report Xen's done count; calls that return nothing in Xen return None.
    """

    def _issue(self, op: Op) -> Any:
        return op

    # -- HYPERVISOR_mmu_update, mmuext_op, update_va_mapping (docs/xen.md sections 4-6) --------------

    def mmu_update(self, reqs: Iterable[tuple[int, int]], foreigndom: int | None = None):
        """A batch of (ptr, val) requests: ptr = machine address of the entry | MmuCmd."""
        request = hypercalls_pb2.MmuUpdateRequest(reqs=[{"ptr": ptr, "val": val} for ptr, val in reqs], foreigndom=foreigndom)
        return self._issue(Op("mmu_update", request, _field("mmu_update", "done")))

    def mmuext_op(self, ops: Iterable[tuple[int, ...]], foreigndom: int | None = None):
        """A batch of (cmd, arg1, arg2) ops with Xen's MMUEXT_* numbers (the wire's are + 1);
        arg1 and arg2 may be left off."""
        request = hypercalls_pb2.MmuextOpRequest(
            ops=[{"cmd": cmd + 1, "arg1": arg1, "arg2": arg2} for cmd, arg1, arg2 in ((*op, 0, 0)[:3] for op in ops)],
            foreigndom=foreigndom,
        )
        return self._issue(Op("mmuext_op", request, _field("mmuext_op", "done")))

    def pin_table(self, level: int, mfn: int):
        """MMUEXT_PIN_L<level>_TABLE: validate the tree under mfn and keep it a pagetable."""
        return self.mmuext_op([(MmuextCmd.PIN_L1_TABLE + level - 1, mfn)])

    def unpin_table(self, mfn: int):
        return self.mmuext_op([(MmuextCmd.UNPIN_TABLE, mfn)])

    def new_baseptr(self, mfn: int):
        """Load an L4 as this vCPU's kernel cr3 (xen_write_cr3)."""
        return self.mmuext_op([(MmuextCmd.NEW_BASEPTR, mfn)])

    def new_user_baseptr(self, mfn: int):
        """Load an L4 (or 0 for none) as this vCPU's user cr3."""
        return self.mmuext_op([(MmuextCmd.NEW_USER_BASEPTR, mfn)])

    def tlb_flush_local(self):
        return self.mmuext_op([(MmuextCmd.TLB_FLUSH_LOCAL,)])

    def invlpg_local(self, va: int):
        return self.mmuext_op([(MmuextCmd.INVLPG_LOCAL, va)])

    def tlb_flush_multi(self, vcpumask_va: int):
        """Flush the vCPUs named by the bitmap at guest address vcpumask_va (flush_tlb_others)."""
        return self.mmuext_op([(MmuextCmd.TLB_FLUSH_MULTI, 0, vcpumask_va)])

    def invlpg_multi(self, va: int, vcpumask_va: int):
        return self.mmuext_op([(MmuextCmd.INVLPG_MULTI, va, vcpumask_va)])

    def tlb_flush_all(self):
        return self.mmuext_op([(MmuextCmd.TLB_FLUSH_ALL,)])

    def invlpg_all(self, va: int):
        return self.mmuext_op([(MmuextCmd.INVLPG_ALL, va)])

    def clear_page(self, mfn: int):
        return self.mmuext_op([(MmuextCmd.CLEAR_PAGE, mfn)])

    def copy_page(self, dst_mfn: int, src_mfn: int):
        return self.mmuext_op([(MmuextCmd.COPY_PAGE, dst_mfn, src_mfn)])

    def update_va_mapping(self, va: int, val: int, flags: int = UVMF_NONE, otherdomain: int | None = None):
        """Write the L1 entry that maps va through the current pagetables, then flush as
        flags (UVMF_*) say."""
        request = hypercalls_pb2.UpdateVaMappingRequest(va=va, val=val, flags=flags, otherdomain=otherdomain)
        return self._issue(Op("update_va_mapping", request, _nothing))

    def multicall(self, entries: Sequence[Op]):
        """HYPERVISOR_multicall of hypercall Ops (built by the base `Hypercalls`): every entry
        runs; the value is one resolved `Pending` per entry."""
        request = hypercalls_pb2.MulticallRequest(entries=[hypercalls_pb2.MulticallEntry(**{op.kind: op.request}) for op in entries])

        def decode(result):
            return [Pending(op, sub) for op, sub in zip(entries, result.multicall.results, strict=True)]

        return self._issue(Op("multicall", request, decode))

    # -- HYPERVISOR_event_channel_op (docs/xen.md section 16.3) ---------------------------------------

    def _evtchn(self, decode: Callable, **op):
        return self._issue(Op("event_channel_op", hypercalls_pb2.EventChannelOpRequest(**op), decode))

    def evtchn_alloc_unbound(self, remote_dom: int | None = None, dom: int | None = None):
        """A new port of dom that remote_dom may bind to; the value is the port."""
        return self._evtchn(_PORT, alloc_unbound={"dom": dom, "remote_dom": remote_dom})

    def evtchn_bind_interdomain(self, remote_port: int, remote_dom: int | None = None):
        return self._evtchn(_PORT, bind_interdomain={"remote_dom": remote_dom, "remote_port": remote_port})

    def evtchn_bind_virq(self, virq: int, vcpu: int = 0):
        return self._evtchn(_PORT, bind_virq={"virq": virq, "vcpu": vcpu})

    def evtchn_bind_ipi(self, vcpu: int):
        """A new IPI port notifying vcpu (bind_ipi_to_irq); the value is the port."""
        return self._evtchn(_PORT, bind_ipi={"vcpu": vcpu})

    def evtchn_bind_vcpu(self, port: int, vcpu: int):
        return self._evtchn(_nothing, bind_vcpu={"port": port, "vcpu": vcpu})

    def evtchn_send(self, port: int):
        """notify_remote_via_evtchn."""
        return self._evtchn(_nothing, send={"port": port})

    def evtchn_close(self, port: int):
        return self._evtchn(_nothing, close={"port": port})

    def evtchn_status(self, port: int, dom: int | None = None):
        """The port's EvtchnStatusResult (state, vcpu, remote end, virq)."""
        return self._evtchn(_field("event_channel_op", "status"), status={"dom": dom, "port": port})

    def evtchn_unmask(self, port: int):
        return self._evtchn(_nothing, unmask={"port": port})

    def evtchn_reset(self, dom: int | None = None):
        """Close every port of dom (the caller's own when unset); by DOMID_SELF, also back to
        the 2-level ABI (docs/xen.md section 24.6)."""
        return self._evtchn(_nothing, reset={"dom": dom})

    def evtchn_init_control(self, control_gfn: int, vcpu: int, offset: int = 0):
        """Register vcpu's FIFO control block (docs/xen.md section 24.2); the value is link_bits."""
        return self._evtchn(_field("event_channel_op", "link_bits"), init_control={"control_gfn": control_gfn, "offset": offset, "vcpu": vcpu})

    def evtchn_expand_array(self, array_gfn: int):
        """Add a page of FIFO event words (1024 ports) to the caller's event array."""
        return self._evtchn(_nothing, expand_array={"array_gfn": array_gfn})

    def evtchn_set_priority(self, port: int, priority: int):
        return self._evtchn(_nothing, set_priority={"port": port, "priority": priority})

    # -- HYPERVISOR_vcpu_op (docs/xen.md section 14) ---------------------------------------------------

    def _vcpu_op(self, vcpuid: int, decode: Callable = _nothing, **op):
        return self._issue(Op("vcpu_op", hypercalls_pb2.VcpuOpRequest(vcpuid=vcpuid, **op), decode))

    def vcpu_initialise(self, vcpuid: int, kernel_cr3_mfn: int, user_cr3_mfn: int = 0, flags: int = VGCF_in_kernel, rip: int = 0, rsp: int = 0):
        """Set a not-yet-run vCPU's context (cpu_initialize_context); rip and rsp reach its
        process in VcpuStarted."""
        context = {"flags": flags, "kernel_cr3_mfn": kernel_cr3_mfn, "user_cr3_mfn": user_cr3_mfn, "rip": rip, "rsp": rsp}
        return self._vcpu_op(vcpuid, initialise={"context": context})

    def vcpu_up(self, vcpuid: int):
        return self._vcpu_op(vcpuid, up={})

    def vcpu_down(self, vcpuid: int):
        return self._vcpu_op(vcpuid, down={})

    def vcpu_is_up(self, vcpuid: int):
        return self._vcpu_op(vcpuid, _field("vcpu_op", "is_up"), is_up={})

    def vcpu_set_singleshot_timer(self, vcpuid: int, timeout_abs_ns: int, flags: int = 0):
        """Arm this vCPU's single-shot VIRQ_TIMER (the timer set_timer_op arms) at an absolute
        Xen system time; vcpuid must be this vCPU's own id (EINVAL otherwise)."""
        return self._vcpu_op(vcpuid, set_singleshot_timer={"timeout_abs_ns": timeout_abs_ns, "flags": flags})

    def vcpu_stop_singleshot_timer(self, vcpuid: int):
        return self._vcpu_op(vcpuid, stop_singleshot_timer={})

    def vcpu_set_periodic_timer(self, vcpuid: int, period_ns: int):
        """Restart a vCPU's periodic VIRQ_TIMER (every vCPU starts with 10 ms); 1 ms at least."""
        return self._vcpu_op(vcpuid, set_periodic_timer={"period_ns": period_ns})

    def vcpu_stop_periodic_timer(self, vcpuid: int):
        """Stop a vCPU's periodic VIRQ_TIMER, as Linux does at boot (docs/linux.md section 11)."""
        return self._vcpu_op(vcpuid, stop_periodic_timer={})

    def vcpu_get_runstate_info(self, vcpuid: int):
        """The vCPU's VcpuRunstateInfo: its state and the ns spent in each."""
        return self._vcpu_op(vcpuid, _field("vcpu_op", "runstate"), get_runstate_info={})

    def vcpu_register_runstate_memory_area(self, vcpuid: int, addr: int):
        """Have Xen copy the vCPU's runstate to guest virtual `addr` at each change (0: stop)."""
        return self._vcpu_op(vcpuid, register_runstate_memory_area={"addr": addr})

    def vcpu_register_vcpu_info(self, vcpuid: int, mfn: int, offset: int):
        """Move the vCPU's vcpu_info out of shared info to byte `offset` of frame `mfn`
        (xen_vcpu_setup; docs/linux.md section 11)."""
        return self._vcpu_op(vcpuid, register_vcpu_info={"mfn": mfn, "offset": offset})

    # -- HYPERVISOR_sched_op, set_timer_op, xen_version (docs/xen.md section 15) -----------------------

    def _sched_op(self, **op):
        return self._issue(Op("sched_op", hypercalls_pb2.SchedOpRequest(**op), _nothing))

    def sched_yield(self):
        return self._sched_op(sched_yield={})

    def sched_block(self):
        """Clear the upcall mask and sleep until an event is pending; the Upcall push comes
        before this call's answer."""
        return self._sched_op(block={})

    def sched_poll(self, ports: Iterable[int], timeout_ns: int = 0):
        """Sleep until one of ports is pending (masked or not) or Xen's system time reaches
        timeout_ns (absolute, as in Xen: `client.system_time_ns + wait`; 0 = no timeout)."""
        return self._sched_op(poll={"ports": list(ports), "timeout_ns": timeout_ns})

    def sched_shutdown(self, reason: int):
        """Shut the domain down for reason, a Xen SHUTDOWN_* number."""
        return self._sched_op(shutdown={"reason": reason + 1})

    def set_timer_op(self, timeout_ns: int):
        """Arm this vCPU's single-shot VIRQ_TIMER at an absolute Xen system time (as in Xen:
        `client.system_time_ns + wait`; one already past fires at once), or stop it (0)."""
        return self._issue(Op("set_timer_op", hypercalls_pb2.SetTimerOpRequest(timeout_ns=timeout_ns), _nothing))

    def xen_version(self):
        """The XenVersionResponse: version, capabilities, virt_start, pagesize."""
        return self._issue(Op("xen_version", hypercalls_pb2.XenVersionRequest(), _field("xen_version")))

    def vm_assist(self, cmd: int, type: int):
        """Turn VM assist `type` (VMASST_TYPE_*) of the domain on or off (`cmd`,
        VMASST_CMD_*; docs/xen.md section 25)."""
        return self._issue(Op("vm_assist", hypercalls_pb2.VmAssistRequest(cmd=cmd, type=type), _nothing))

    # -- HYPERVISOR_memory_op (docs/xen.md section 23) ----------------------------------------------

    def _memory_op(self, decode: Callable, **op):
        return self._issue(Op("memory_op", hypercalls_pb2.MemoryOpRequest(**op), decode))

    def populate_physmap(self, pfns: Sequence[int], extent_order: int = 0):
        """An extent for each pfn, its M2P set to it: the new mfns, one per extent done (fewer
        than asked when Xen could not do them all)."""
        return self._memory_op(_extents, populate_physmap=_reservation(pfns, extent_order))

    def increase_reservation(self, nr_extents: int, extent_order: int = 0):
        """nr_extents extents for this domain: their first mfns."""
        return self._memory_op(_extents, increase_reservation=_reservation([0] * nr_extents, extent_order))

    def decrease_reservation(self, mfns: Sequence[int], extent_order: int = 0):
        """Give these extents back to Xen: how many were given back (all, unless Xen stopped)."""
        return self._memory_op(_field("memory_op", "result"), decrease_reservation=_reservation(mfns, extent_order))

    def current_reservation(self):
        return self._memory_op(_field("memory_op", "result"), current_reservation={})

    def maximum_reservation(self):
        return self._memory_op(_field("memory_op", "result"), maximum_reservation={})

    # -- simulated memory accesses through this vCPU's MMU (memory.proto) -----------------------

    def load(self, va: int, size: int = 8, user: bool = False):
        """The little-endian integer at va (naturally aligned), or a PageFault."""
        return self._issue(Op("load", memory_pb2.LoadRequest(va=va, size=size, user_mode=user), _LOAD))

    def store(self, va: int, value: int, size: int = 8, user: bool = False):
        """None, or a PageFault (the store had no effect)."""
        return self._issue(Op("store", memory_pb2.StoreRequest(va=va, size=size, value=value, user_mode=user), _STORE))

    def atomic(self, op: str, va: int, operand: int, size: int = 8, expected: int = 0, user: bool = False):
        """A locked read-modify-write; op is cmpxchg, xchg, fetch_add, fetch_or or fetch_and.
        The value is the old contents, or a PageFault."""
        request = memory_pb2.AtomicRequest(
            op=memory_pb2.AtomicOp.Value(f"ATOMIC_OP_{op.upper()}"), va=va, size=size, operand=operand, expected=expected, user_mode=user
        )
        return self._issue(Op("atomic", request, _ATOMIC))

    def read(self, va: int, length: int, user: bool = False):
        """length bytes from va (within one page), or a PageFault."""
        return self._issue(Op("read", memory_pb2.ReadRequest(va=va, length=length, user_mode=user), _READ))

    def write(self, va: int, data: bytes, user: bool = False):
        """None, or a PageFault (nothing was written)."""
        return self._issue(Op("write", memory_pb2.WriteRequest(va=va, data=data, user_mode=user), _STORE))

    def echo(self, payload: bytes = b""):
        """The payload back, having touched nothing: the transport's floor."""
        return self._issue(Op("echo", hypercalls_pb2.EchoRequest(payload=payload), _field("echo", "payload")))


def _reservation(extents: Sequence[int], order: int) -> hypercalls_pb2.XenMemoryReservation:
    return hypercalls_pb2.XenMemoryReservation(extent_start=extents, nr_extents=len(extents), extent_order=order)


def _extents(result) -> list[int]:
    """The mfns a reservation op wrote, one per extent it did."""
    return list(result.memory_op.extent_start[: result.memory_op.result])


_PORT = _field("event_channel_op", "port")
_LOAD = _faulted_or("value")
_STORE = _faulted_or(None)
_ATOMIC = _faulted_or("old")
_READ = _faulted_or("data")

ops = Hypercalls()
"""Builds Ops without issuing them: `await client.submit([ops.load(va), ops.tlb_flush_local()])`."""


def _results(response: hypercalls_pb2.SessionResponse):
    if response.HasField("status"):
        raise status_error(response.status)
    return response.results


class HypercallClient(Hypercalls):
    """A vCPU's hypercalls over its Session: each method sends one message and returns the
    call's value; `batch()` and `submit()` put many calls in one message."""

    def __init__(self, session: Session):
        self.session = session
        # A controlled run (docs/schedule.md section 6): the hypervisor decides when this vCPU's
        # next message runs, and time is Xen's virtual system time, so the guest decides
        # nothing from the wall clock.
        self.controlled = False

    def clock(self) -> float:
        """Seconds for the guest's own deadlines: Xen system time in a controlled run, else
        the wall clock (time.monotonic)."""
        return self.system_time_ns / 1e9 if self.controlled else time.monotonic()

    async def relax(self, seconds: float) -> None:
        """Let `seconds` of wall time pass between two messages (a spin's back-off, an idle
        wait); in a controlled run only a checkpoint, since nothing can arrive meanwhile
        (upcalls come with answers) and the scheduler decides how long the vCPU waits."""
        await trio.sleep(0 if self.controlled else seconds)

    @property
    def system_time_ns(self) -> int:
        """Xen's system time (ns) as of the latest message from the hypervisor: what a PV guest
        reads from vcpu_time_info, and the base of the absolute deadlines that sched_poll,
        set_timer_op and vcpu_set_singleshot_timer take."""
        return self.session.system_time_ns

    async def wait_started(self) -> hypercalls_pb2.VcpuStarted:
        """Wait until the hypervisor starts this vCPU (at once for a vCPU that is up; after
        VCPUOP_up for a secondary one), as a vCPU process must before running guest code."""
        try:
            return await self.session.started.receive()
        except trio.EndOfChannel:
            raise SessionClosed("the Session ended before the vCPU was started") from None

    async def _issue(self, op: Op) -> Any:
        (result,) = _results(await self.session.exchange([op.call()]))
        return Pending(op, result).result()

    async def submit(self, calls: Iterable[Op], stop_on_error: bool = False) -> list[Pending]:
        """Run Ops (from `ops`) in order in one Session message (more than 1024 take several,
        sent one after another) and return one resolved Pending per call."""
        pendings = [Pending(op) for op in calls]
        await self._run(pendings, stop_on_error)
        return pendings

    def batch(self, stop_on_error: bool = False) -> "Batch":
        """`async with client.batch() as b:` queues b.<call>(...) (each returns a Pending) and
        sends them all as one message when the block ends without an exception. With
        stop_on_error the message stops at the first error or page fault; later calls are
        CallSkipped."""
        return Batch(self, stop_on_error)

    async def _run(self, pendings: list[Pending], stop_on_error: bool = False) -> None:
        for start in range(0, len(pendings), MAX_CALLS_PER_MESSAGE):
            chunk = pendings[start : start + MAX_CALLS_PER_MESSAGE]
            results = _results(await self.session.exchange([p.op.call() for p in chunk], stop_on_error))
            for pending, result in zip(chunk, results):
                pending._result = result
            if len(results) < len(chunk):
                for pending in pendings[start + len(results) :]:
                    pending._result = _SKIPPED
                return


@asynccontextmanager
async def connect(target: str, token: str, vcpu: int) -> AsyncIterator[HypercallClient]:
    """The client of vCPU `vcpu` of the domain whose token is `token`, on the hypervisor at
    `target` (`host:port`); its Session closes when the block ends."""
    async with open_session(target, token, vcpu) as session:
        yield HypercallClient(session)


@asynccontextmanager
async def claim(target: str, tokens: Sequence[str]) -> AsyncIterator[tuple[int, int, HypercallClient] | None]:
    """The first free vCPU of these domains, tried in order (vCPU ids from 0 up), as (index of
    its token, vCPU id, client); None when every one is taken.

    The hypervisor keeps one Session per vCPU and refuses a second with ALREADY_EXISTS, so an
    open Session is the claim, and processes on any host can share out a domain's vCPUs with
    nothing but its token. An echo proves the Session was accepted (the stream says nothing
    until a vCPU is started); an id past the domain's last vCPU is INVALID_ARGUMENT."""
    for index, token in enumerate(tokens):
        for vcpu in itertools.count():
            async with connect(target, token, vcpu) as client:
                try:
                    await client.echo()
                except SessionClosed as e:
                    if e.code == grpc.StatusCode.ALREADY_EXISTS:
                        continue
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        break
                    raise
                yield index, vcpu, client
                return
    yield None


class QueuedCalls(Hypercalls):
    """Calls queued now and issued together by `flush()` (or at the end of an `async with`
    block that raised nothing); each queued call returns its Pending. `callback(fn, *args)`
    runs fn(*args) after the flush, in queue order (Linux's xen_mc_callback); pass a Pending as
    an argument to act on that call's result."""

    def __init__(self):
        self._pendings: list[Pending] = []
        self._callbacks: list[tuple[Callable, tuple]] = []

    def _issue(self, op: Op) -> Pending:
        pending = Pending(op)
        self._pendings.append(pending)
        return pending

    def callback(self, fn: Callable, *args) -> None:
        self._callbacks.append((fn, args))

    async def flush(self) -> None:
        pendings, callbacks = self._pendings, self._callbacks
        self._pendings, self._callbacks = [], []
        if pendings:
            await self._send(pendings)
        for fn, args in callbacks:
            fn(*args)

    async def _send(self, pendings: list[Pending]) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.flush()


class Batch(QueuedCalls):
    """Calls of any kind sent as one Session message (see HypercallClient.batch)."""

    def __init__(self, client: HypercallClient, stop_on_error: bool = False):
        super().__init__()
        self._client, self._stop_on_error = client, stop_on_error

    async def _send(self, pendings: list[Pending]) -> None:
        await self._client._run(pendings, self._stop_on_error)

