"""Protobuf <-> core: one table that turns each Call case into a core op with its arguments,
and the op's result back into the case's response message; plus the Toolstack's records.

`CALLS[case]` serves the unary RPCs, the Session's calls and the multicall entries alike (one
code path). Argument builders check what the proto calls malformed (an unset enum, a size that
is not 1/2/4/8, a batch beyond abi.MAX_BATCH, a missing oneof) and raise `BadRequest` naming the
field, so nothing malformed reaches the core; everything else is the core's to judge, numbers
Xen does not know included (it answers them as Xen does, with ENOSYS). Proto enums that mirror
a zero-based Xen numbering carry Xen's number + 1 (common.proto), so builders subtract one and
result builders add it back.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from hypervisor.core import abi
from hypervisor.core.abi import DOMID_SELF, MAX_BATCH, PAGE_OFFSET, PAGE_OFFSET_PAE, PAGE_SIZE, START_INFO_MAGIC, START_INFO_MAGIC_PAE, Errno
from xensim.v1 import common_pb2, hypercalls_pb2, memory_pb2, toolstack_pb2

from .errors import BadRequest, xen_status

MAX_SESSION_CALLS = 1024  # hypercalls.proto SessionRequest.calls
MAX_FRAME_INFO = 4096  # toolstack.proto FrameInfoRequest.count
_SIZES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class Clock(Protocol):
    def catch_up(self) -> int:
        """Xen's system time now, the core's clock first brought to it (its advance_time):
        a call that names a deadline is judged against the present."""


@dataclass(frozen=True, slots=True)
class Op:
    """How one Call case runs: the core's op name (None: answered without the core), its
    arguments from the request, and how its response message is filled from the core's result
    and those arguments (`fill`)."""

    name: str | None
    args: Callable[[Message, str, Clock], dict]
    result: Callable[[Message, Any, dict], None]


# -- checks of malformed input ----------------------------------------------------------------


def _count(items, path: str, field: str, limit: int) -> None:
    """A batch's size: Xen's loops take none too (done 0); the simulator bounds the rest."""
    if len(items) > limit:
        raise BadRequest(f"{path}{field}", f"{len(items)} entries; 0 to {limit} allowed")


def _enum(value: int, enum: EnumDescriptor, path: str, field: str) -> int:
    """A named, specified value of an enum of the simulator's own (proto3 enums are open:
    grpcurl sends any number). As the checks below, it names `path` + `field` only when it
    fails: formatting it for every call cost more than the check."""
    if value == 0 or value not in enum.values_by_number:
        raise BadRequest(f"{path}{field}", f"{value} is not a named {enum.name} value (0 means unset)")
    return value


def _xen_number(value: int, enum: EnumDescriptor, path: str) -> int:
    """Xen's number for a value of an enum that mirrors a zero-based Xen numbering: any value
    but unset, for Xen to judge as it judges a guest's (common.proto); Xen's field is unsigned."""
    if value == 0:
        raise BadRequest(path, f"no {enum.name} set (0 means unset)")
    return (value - 1) & 0xFFFFFFFF


def _case(msg: Message, oneof: str, path: str) -> str:
    case = msg.WhichOneof(oneof)
    if case is None:
        raise BadRequest(f"{path}{oneof}", f"no {oneof} set")
    return case


def _size(request, path: str) -> int:
    if request.size not in _SIZES:
        raise BadRequest(f"{path}size", f"{request.size} is not 1, 2, 4 or 8")
    if request.va % request.size:
        raise BadRequest(f"{path}va", f"{request.va:#x} is not a multiple of size {request.size}")
    return _SIZES[request.size]


def _fits(value: int, mask: int, path: str, field: str) -> int:
    if value & ~mask:
        raise BadRequest(f"{path}{field}", f"{value:#x} has bits above the access size")
    return value


def _within_page(va: int, length: int, path: str, field: str) -> None:
    if not 1 <= length <= PAGE_SIZE - va % PAGE_SIZE:
        raise BadRequest(f"{path}{field}", f"{length} bytes at {va:#x} do not lie within one 4 KiB page (1 to 4096 bytes)")


def _set_fields(msg: Message) -> dict:
    """A message's fields as core arguments, optional ones only when set (unset = the core's
    default, DOMID_SELF for a domain)."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields if not f.has_presence or msg.HasField(f.name)}


def _domid(msg: Message, name: str) -> int:
    return getattr(msg, name) if msg.HasField(name) else DOMID_SELF


# -- argument builders ----------------------------------------------------------------------


def _mmu_update_args(msg, path, clock) -> dict:
    _count(msg.reqs, path, "reqs", MAX_BATCH)
    return {"reqs": [[r.ptr, r.val] for r in msg.reqs], "foreigndom": _domid(msg, "foreigndom")}


def _mmuext_op_args(msg, path, clock) -> dict:
    _count(msg.ops, path, "ops", MAX_BATCH)
    cmd = common_pb2.MmuextCmd.DESCRIPTOR
    ops = [[_xen_number(op.cmd, cmd, f"{path}ops[{i}].cmd"), op.arg1, op.arg2] for i, op in enumerate(msg.ops)]
    return {"ops": ops, "foreigndom": _domid(msg, "foreigndom")}


def _update_va_mapping_args(msg, path, clock) -> dict:
    args = {"va": msg.va, "val": msg.val, "flags": msg.flags}
    if msg.HasField("otherdomain"):  # update_va_mapping_otherdomain
        args["domid"] = msg.otherdomain
    return args


def _multicall_args(msg, path, clock) -> dict:
    _count(msg.entries, path, "entries", MAX_BATCH)
    calls = []
    for i, entry in enumerate(msg.entries):
        where = f"{path}entries[{i}]."
        case = _case(entry, "call", where)
        op = CALLS[case]
        calls.append({"op": op.name, "args": op.args(getattr(entry, case), f"{where}{case}.", clock)})
    return {"calls": calls}


def _op_numbers(message: type[Message], prefix: str, xen_names: dict[str, str] | None = None) -> dict[int, str]:
    """The case of each op that a sub-op oneof names, by Xen's number (abi.<prefix><Xen's name>,
    the case's name unless `xen_names` says otherwise)."""
    cases = [f.name for f in message.DESCRIPTOR.oneofs_by_name["op"].fields if f.name != "cmd"]
    return {getattr(abi, prefix + (xen_names or {}).get(case, case)): case for case in cases}


def _cmd(msg: Message, path: str, numbers: dict[int, str]) -> str | int:
    """The op a sub-op oneof names: its case, or for the `cmd` case a number that has no case,
    which reaches the core as a number (ENOSYS there, as in Xen)."""
    case = _case(msg, "op", path)
    if case != "cmd":
        return case
    if msg.cmd in numbers:
        raise BadRequest(f"{path}cmd", f"{msg.cmd} is {numbers[msg.cmd]}, which has a case of its own: set {numbers[msg.cmd]}")
    return msg.cmd


_EVTCHNOP_NUMBERS = _op_numbers(hypercalls_pb2.EventChannelOpRequest, "EVTCHNOP_")
_VCPUOP_NUMBERS = _op_numbers(hypercalls_pb2.VcpuOpRequest, "VCPUOP_")


def _event_channel_op_args(msg, path, clock) -> dict:
    cmd = _cmd(msg, path, _EVTCHNOP_NUMBERS)
    return {"cmd": cmd} if isinstance(cmd, int) else {"cmd": cmd, **_set_fields(getattr(msg, cmd))}


def _vcpu_op_args(msg, path, clock) -> dict:
    """The core's clock is brought to now first: a deadline already past fires at once, a
    periodic timer starts on the present's beat and a runstate changes at the present
    (docs/vcpu-time.md section 6)."""
    cmd = _cmd(msg, path, _VCPUOP_NUMBERS)
    args = {"cmd": cmd, "vcpuid": msg.vcpuid}
    if isinstance(cmd, int):
        return args
    clock.catch_up()
    if cmd == "initialise":
        c = msg.initialise.context
        args["context"] = {"flags": c.flags, "ctrlreg3": c.kernel_cr3_mfn, "ctrlreg1": c.user_cr3_mfn, "rip": c.rip, "rsp": c.rsp}
    else:
        args.update(_set_fields(getattr(msg, cmd)))
    return args


_XENMEM_NUMBERS = _op_numbers(hypercalls_pb2.MemoryOpRequest, "XENMEM_")


def _reservation(msg, path: str) -> dict:
    _count(msg.extent_start, path, "extent_start", MAX_BATCH)
    return {"extent_start": list(msg.extent_start), "nr_extents": msg.nr_extents, "extent_order": msg.extent_order, "mem_flags": msg.mem_flags, "domid": _domid(msg, "domid")}


def _memory_op_args(msg, path, clock) -> dict:
    cmd = _cmd(msg, path, _XENMEM_NUMBERS)
    if isinstance(cmd, int) or cmd == "maximum_ram_page":
        return {"cmd": cmd}
    arg, where = getattr(msg, cmd), f"{path}{cmd}."
    if cmd == "exchange":
        return {"cmd": cmd, "input": _reservation(arg.input, f"{where}input."), "output": _reservation(arg.output, f"{where}output."), "nr_exchanged": arg.nr_exchanged}
    if cmd in ("current_reservation", "maximum_reservation"):
        return {"cmd": cmd, "domid": _domid(arg, "domid")}
    return {"cmd": cmd, **_reservation(arg, where)}




def _deadline(msg, path: str, clock: Clock) -> int:
    """The absolute deadline (Xen system time; 0 = none) that a poll or set_timer_op names:
    Xen's `timeout_ns`, or now + `timeout_ns_relative`, the form hypercalls.proto keeps for
    callers who cannot see Xen's clock. Either way the core's clock is brought to now first,
    so that a deadline already past fires at once."""
    if not msg.HasField("timeout_ns_relative"):
        if msg.timeout_ns:
            clock.catch_up()
        return msg.timeout_ns
    if msg.timeout_ns:
        raise BadRequest(f"{path}timeout_ns_relative", "set timeout_ns (absolute Xen system time) or timeout_ns_relative, not both")
    return clock.catch_up() + msg.timeout_ns_relative


_SCHEDOP_CMD = {"sched_yield": "yield", "block": "block", "poll": "poll", "shutdown": "shutdown"}
_SCHEDOP_NUMBERS = _op_numbers(hypercalls_pb2.SchedOpRequest, "SCHEDOP_", _SCHEDOP_CMD)


def _sched_op_args(msg, path, clock) -> dict:
    case = _cmd(msg, path, _SCHEDOP_NUMBERS)
    if isinstance(case, int):
        return {"cmd": case}
    args = {"cmd": _SCHEDOP_CMD[case]}
    if case == "block":
        clock.catch_up()  # the vCPU sleeps from now on (its runstate)
    elif case == "poll":
        args.update(ports=list(msg.poll.ports), timeout_ns=_deadline(msg.poll, f"{path}poll.", clock))
        if not args["timeout_ns"]:  # _deadline caught up otherwise
            clock.catch_up()
    elif case == "shutdown":
        args["reason"] = _xen_number(msg.shutdown.reason, common_pb2.ShutdownReason.DESCRIPTOR, f"{path}shutdown.reason")
    return args


def _load_args(msg, path, clock) -> dict:
    _size(msg, path)
    return {"va": msg.va, "size": msg.size, "user": msg.user_mode}


def _store_args(msg, path, clock) -> dict:
    mask = _size(msg, path)
    return {"va": msg.va, "size": msg.size, "value": _fits(msg.value, mask, path, "value"), "user": msg.user_mode}


# The core's name of each AtomicOp (ATOMIC_OP_CMPXCHG -> "cmpxchg"), looked up once.
_ATOMIC_OPERATIONS = {v.number: v.name.removeprefix("ATOMIC_OP_").lower() for v in memory_pb2.AtomicOp.DESCRIPTOR.values if v.number}


def _atomic_args(msg, path, clock) -> dict:
    op = _enum(msg.op, memory_pb2.AtomicOp.DESCRIPTOR, path, "op")
    mask = _size(msg, path)
    args = {
        "operation": _ATOMIC_OPERATIONS[op],
        "va": msg.va,
        "size": msg.size,
        "operand": _fits(msg.operand, mask, path, "operand"),
        "user": msg.user_mode,
    }
    if op == memory_pb2.ATOMIC_OP_CMPXCHG:
        args["expected"] = _fits(msg.expected, mask, path, "expected")
    return args


def _read_args(msg, path, clock) -> dict:
    _within_page(msg.va, msg.length, path, "length")
    return {"va": msg.va, "length": msg.length, "user": msg.user_mode}


def _write_args(msg, path, clock) -> dict:
    _within_page(msg.va, len(msg.data), path, "data")
    return {"va": msg.va, "data": msg.data, "user": msg.user_mode}


# -- result builders ------------------------------------------------------------------------
# Each fills the case's response message in place (a CallResult's, or a unary RPC's own), so a
# Session answer is built where it is sent from, with no message made and then copied.


def _fault(out: memory_pb2.PageFault, fault: dict) -> None:
    out.address, out.error_code, out.detail = fault["va"], fault["error_code"], fault["detail"]


def _access(out: Message, result: dict, args: dict) -> None:
    """A memory access's response: the core's {key: value}, {} or {"fault": ...}."""
    fault = result.get("fault")
    if fault is not None:
        _fault(out.fault, fault)
    else:
        for key, value in result.items():
            setattr(out, key, value)


def _done(out: Message, done: int, args: dict) -> None:
    out.done = done


def _multicall_result(out: hypercalls_pb2.MulticallResponse, results: list[dict], args: dict) -> None:
    for call, outcome in zip(args["calls"], results, strict=True):
        entry = out.results.add()
        if "errno" in outcome:
            done = outcome.get("done")
            entry.status.CopyFrom(xen_status(Errno[outcome["errno"]], outcome["message"], call["op"], done, done))
        else:
            case = CASE_OF_OP[call["op"]]
            fill(CALLS[case], getattr(entry, case), outcome["result"], call["args"])


def _event_channel_op_result(out: hypercalls_pb2.EventChannelOpResponse, result, args: dict) -> None:
    if args["cmd"] == "status":
        out.status.CopyFrom(evtchn_status(result))
    elif args["cmd"] == "init_control":
        out.link_bits = result["link_bits"]
    else:
        out.port = result


def evtchn_status(status: dict) -> hypercalls_pb2.EvtchnStatusResult:
    return hypercalls_pb2.EvtchnStatusResult(**{**status, "state": status["state"] + 1})


def _vcpu_op_result(out: hypercalls_pb2.VcpuOpResponse, result, args: dict) -> None:
    if args["cmd"] == "get_runstate_info":
        runstate = out.runstate
        runstate.state = result["state"] + 1
        runstate.state_entry_time = result["state_entry_time"]
        runstate.time[:] = result["time"]
    else:
        out.is_up = bool(result)


def _memory_op_result(out: hypercalls_pb2.MemoryOpResponse, result: dict, args: dict) -> None:
    """The core's {"result", and per op "extent_start", "nr_exchanged", "stopped"}."""
    out.result = result["result"]
    out.extent_start.extend(result.get("extent_start", ()))
    out.nr_exchanged = result.get("nr_exchanged", 0)
    out.stopped = result.get("stopped", "")


def _xen_version_result(out: hypercalls_pb2.XenVersionResponse, version: dict, args: dict) -> None:
    out.CopyFrom(hypercalls_pb2.XenVersionResponse(**version))


def _echo_result(out: hypercalls_pb2.EchoResponse, result, args: dict) -> None:
    out.payload = args["payload"]


def _empty(out: Message, result, args: dict) -> None:
    pass


def fill(op: Op, out: Message, result: Any, args: dict) -> None:
    """`out`, the response message of `op`'s case, filled from the core's result in place, and
    present even when it has no field set (an empty response is an answer too)."""
    out.SetInParent()
    op.result(out, result, args)


CALLS: dict[str, Op] = {
    "mmu_update": Op("mmu_update", _mmu_update_args, _done),
    "mmuext_op": Op("mmuext_op", _mmuext_op_args, _done),
    "update_va_mapping": Op("update_va_mapping", _update_va_mapping_args, _empty),
    "multicall": Op("multicall", _multicall_args, _multicall_result),
    "event_channel_op": Op("event_channel_op", _event_channel_op_args, _event_channel_op_result),
    "vcpu_op": Op("vcpu_op", _vcpu_op_args, _vcpu_op_result),
    "sched_op": Op("sched_op", _sched_op_args, _empty),
    "set_timer_op": Op("set_timer_op", lambda msg, path, clock: {"timeout_ns": _deadline(msg, path, clock)}, _empty),
    "xen_version": Op("xen_version", lambda msg, path, clock: {}, _xen_version_result),
    "load": Op("load", _load_args, _access),
    "store": Op("store", _store_args, _access),
    "atomic": Op("atomic", _atomic_args, _access),
    "read": Op("read", _read_args, _access),
    "write": Op("write", _write_args, _access),
    "memory_op": Op("memory_op", _memory_op_args, _memory_op_result),
    "vm_assist": Op("vm_assist", lambda msg, path, clock: {"cmd": msg.cmd, "type": msg.type}, _empty),
    "echo": Op(None, lambda msg, path, clock: {"payload": msg.payload}, _echo_result),
}
CASE_OF_OP = {op.name: case for case, op in CALLS.items() if op.name}


def faulted(result: Any) -> bool:
    """A memory access that raised a page fault (which stop_on_error treats as a failure)."""
    return isinstance(result, dict) and "fault" in result


# -- Toolstack records ----------------------------------------------------------------------


def start_info(info: dict, address_size: int = 64) -> common_pb2.StartInfo:
    """A domain's start info; a 32-bit PAE guest's magic and direct map are its own (docs/pv32.md section 4)."""
    if address_size == 32:
        return common_pb2.StartInfo(magic=START_INFO_MAGIC_PAE.decode(), page_offset=PAGE_OFFSET_PAE, **info)
    return common_pb2.StartInfo(magic=START_INFO_MAGIC.decode(), page_offset=PAGE_OFFSET, **info)


def frame(info: dict) -> toolstack_pb2.Frame:
    owner = info.pop("owner")
    record = toolstack_pb2.Frame(**{**info, "type": common_pb2.PageType.Value(f"PAGE_TYPE_{info['type']}")})
    if owner is not None:
        record.owner = owner
    return record


def pagetable(table: dict) -> toolstack_pb2.PagetableFrame:
    """A `views.pagetable` record as its message."""
    entries = []
    for e in table["entries"]:
        entry = toolstack_pb2.PagetableEntry(slot=e["slot"], entry=e["entry"], mfn=e["mfn"], xen_slot=e["xen_slot"])
        if e["pfn"] is not None:
            entry.pfn = e["pfn"]
        if e["frame"] is not None:
            entry.target.CopyFrom(frame(e["frame"]))
        entries.append(entry)
    return toolstack_pb2.PagetableFrame(level=table["level"], frame=frame(table["frame"]), entries=entries, address_size=table["address_size"])


def vcpu_started(vcpu, domain) -> hypercalls_pb2.VcpuStarted:
    """The push that starts a vCPU's process: its context now (VCPUOP_initialise's, or the
    builder's for vCPU 0), and vCPU 0's start info."""
    context = hypercalls_pb2.VcpuGuestContext(
        flags=vcpu.vgc_flags, kernel_cr3_mfn=vcpu.guest_table, user_cr3_mfn=vcpu.guest_table_user, rip=vcpu.rip, rsp=vcpu.rsp
    )
    started = hypercalls_pb2.VcpuStarted(vcpu_id=vcpu.vcpu_id, context=context)
    if vcpu.vcpu_id == 0:
        started.start_info.CopyFrom(start_info(domain.start_info, domain.address_size))
    return started
