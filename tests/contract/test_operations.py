"""One list of operations: the core's dispatch tables and the wire contract name the same
operations, both ways, and every field a request carries reaches a parameter of its handler.

A Call case runs the core op that convert.CALLS names; an op with sub-ops (event_channel_op,
vcpu_op, sched_op) runs the handler its table names for the converted `cmd`. Each request is
built with every field set, in variants that between them take every oneof case and every
named enum value, and converted exactly as the server converts it. The arguments of every
variant must bind to the handler (a field the handler does not take would be INTERNAL at run
time), and the variants of an op together must set every parameter of its handler (a
parameter that no field sets is a part of the core with no wire path). The Toolstack's
mutations take the parameters of the core's toolstack ops by name, and the toolstack ops that
no RPC runs are run by the server itself.
"""

import inspect
import itertools
import pathlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from hypervisor.core import evtchn, memop, schedop, vcpuop
from hypervisor.core.hypervisor import HYPERCALLS, TOOLSTACK, Hypervisor
from hypervisor.server import convert
from xensim.v1 import hypercalls_pb2, toolstack_pb2

SERVER = pathlib.Path(convert.__file__).parent

# Ops that look up a sub-op: its table and how many leading parameters of a sub-op's handler
# the dispatcher supplies itself (hv and the caller; vcpu_op also the domain and target vCPU).
SUB_OPS: dict[str, tuple[dict[str, Callable], int]] = {
    "event_channel_op": (evtchn.EVTCHNOP, 2),
    "vcpu_op": (vcpuop.VCPUOP, 3),
    "sched_op": (schedop.SCHEDOP, 2),
    "memory_op": (memop.XENMEM, 3),
}
SCALARS = {
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_BYTES: b"\x01",
    FieldDescriptor.TYPE_STRING: "x",
}
NO_OP_NUMBER = 99  # for the `cmd` cases, which carry the number of an op that has no case
# Parameters that only Hypervisor.resume sets, from a Continuation (where a preempted batch goes
# on: the next entry, a multicall's results so far and the continuation of the entry it stopped
# in; hypervisor/core/preempt.py): no guest names them, as Xen's continuations rewrite the
# hypercall's arguments themselves (hypercall_create_continuation), so no wire field does.
CONTINUATION_ONLY = {"mmu_update": {"start"}, "mmuext_op": {"start"}, "multicall": {"start", "results", "inner"}, "memory_op": {"start", "out"}}
CONTINUATION_ONLY |= {f"memory_op.{op}": {"start", "out"} for op in ("increase_reservation", "decrease_reservation", "populate_physmap", "exchange")}


class Clock:
    """convert.Clock for conversions outside a server: Xen's system time stands at 0."""

    def catch_up(self) -> int:
        return 0


def variants(descriptor: Descriptor, outer: tuple[Descriptor, ...] = ()) -> list[Message]:
    """Messages of this type with every field set: each oneof case, each named enum value and
    each variant of a nested message appears in at least one of them. A field `X_relative`
    (the relative form kept for grpcurl beside an absolute `X`) excludes `X`, like a oneof. A
    oneof case of a type already being built (a multicall entry's multicall) is built empty."""
    axes: list[list[tuple[str, object]]] = []
    outer = (*outer, descriptor)
    for oneof in descriptor.oneofs:
        if not oneof.name.startswith("_"):  # a real oneof, not a proto3 `optional`
            axes.append([(field.name, value) for field in oneof.fields for value in _values(field, outer)])
    names = descriptor.fields_by_name
    for field in descriptor.fields:
        if field.name.removesuffix("_relative") in names and field.name.endswith("_relative"):
            continue  # on the axis of its absolute twin
        if field.containing_oneof is None or field.containing_oneof.name.startswith("_"):
            twins = [field, names[f"{field.name}_relative"]] if f"{field.name}_relative" in names else [field]
            axes.append([(twin.name, value) for twin in twins for value in _values(twin, outer)])
    cls = GetMessageClass(descriptor)
    count = max((len(axis) for axis in axes), default=1)
    return [cls(**dict(axis[k % len(axis)] for axis in axes)) for k in range(count)]


def _values(field: FieldDescriptor, outer: tuple[Descriptor, ...] = ()) -> list:
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type in outer:
        values = [GetMessageClass(field.message_type)()]
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        values = variants(field.message_type, outer)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values if v.number]
    elif field.name == "cmd":
        values = [NO_OP_NUMBER]
    else:
        values = [SCALARS.get(field.type, 1)]
    return [[value] for value in values] if field.is_repeated else values


def _parameters(handler: Callable, skip: int) -> inspect.Signature:
    signature = inspect.signature(handler)
    return signature.replace(parameters=list(signature.parameters.values())[skip:])


def _names(signature: inspect.Signature) -> set[str]:
    return {p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD}


def calls_by_handler() -> dict[str, list[dict]]:
    """Every converted call of every variant of every Call case, keyed by the handler that
    runs it: `op` for a plain core op, `op.cmd` for a sub-op (multicall entries included)."""
    runs: dict[str, list[dict]] = defaultdict(list)

    def add(op: str, args: dict) -> None:
        runs[op].append(args)
        if op == "multicall":
            for call in args["calls"]:
                add(call["op"], call["args"])
        elif op in SUB_OPS:
            own = _names(_parameters(HYPERCALLS[op], 2))
            fields = {k: v for k, v in args.items() if k not in own}
            if isinstance(args["cmd"], str):  # a number without a case reaches the table as is
                runs[f"{op}.{args['cmd']}"].append(fields)

    for case, op in convert.CALLS.items():
        if op.name is not None:
            message_type = hypercalls_pb2.Call.DESCRIPTOR.fields_by_name[case].message_type
            for message in variants(message_type):
                add(op.name, op.args(message, "", Clock()))
    return runs


RUNS = calls_by_handler()


def handlers() -> Iterator[tuple[str, inspect.Signature]]:
    for op, handler in HYPERCALLS.items():
        yield op, _parameters(handler, 2)
        if op in SUB_OPS:
            table, skip = SUB_OPS[op]
            for cmd, sub in table.items():
                yield f"{op}.{cmd}", _parameters(sub, skip)


HANDLERS = dict(handlers())


def test_every_core_hypercall_has_a_call_case_and_every_call_case_a_core_op():
    assert {op.name for op in convert.CALLS.values() if op.name is not None} == set(HYPERCALLS)


@pytest.mark.parametrize("op", sorted(SUB_OPS))
def test_every_sub_op_of_the_core_is_reached_from_the_wire(op):
    assert {name.split(".", 1)[1] for name in RUNS if name.startswith(f"{op}.")} == set(SUB_OPS[op][0])


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_every_converted_call_binds_to_its_handler_and_together_they_set_every_parameter(name):
    signature = HANDLERS[name]
    runs = RUNS[name]
    assert runs, f"{name}: no request reaches it"
    for args in runs:
        try:
            signature.bind(**args)
        except TypeError as e:
            pytest.fail(f"{name}{signature} cannot take the wire's {sorted(args)}: {e}")
    exempt = CONTINUATION_ONLY.get(name, set())
    assert exempt <= _names(signature), f"{name}: exempts parameters it does not have"
    assert set(itertools.chain.from_iterable(runs)) >= _names(signature) - exempt, f"{name}: parameters no field sets"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_toolstack_rpcs_take_the_parameters_of_the_core_ops_they_run_by_name():
    rpcs = {_snake(m.name): m for m in toolstack_pb2.DESCRIPTOR.services_by_name["Toolstack"].methods}
    mutations = {op: rpcs[op] for op in TOOLSTACK if op in rpcs}
    assert mutations, "no Toolstack RPC runs a core toolstack op"
    for op, method in mutations.items():
        fields = {f.name for f in method.input_type.fields}
        assert fields == _names(_parameters(TOOLSTACK[op], 1)), op


def test_toolstack_ops_no_rpc_runs_are_run_by_the_server_itself():
    """The adapter's own ops (the clock, upcall delivery): called by name, or through the
    Hypervisor method of the same name that runs them."""
    source = "\n".join(path.read_text() for path in SERVER.glob("*.py"))
    rpcs = {_snake(m.name) for m in toolstack_pb2.DESCRIPTOR.services_by_name["Toolstack"].methods}
    for op in sorted(set(TOOLSTACK) - rpcs):
        by_method = hasattr(Hypervisor, op) and f".{op}(" in source
        assert f'toolstack("{op}"' in source or by_method, f"{op}: no Toolstack RPC runs it and the server does not either"
