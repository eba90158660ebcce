"""Protobuf-level fuzzing of every RPC against a live server: whatever arrives, the answer is a
Xen errno, INVALID_ARGUMENT or another deliberate status, never UNKNOWN or INTERNAL; the
server stays up and SERVING, and its audit stays clean.

Requests are drawn from the generated descriptors (`Requests`): integers anywhere in their
wire range with the boundaries favoured, enum numbers with no name, unset and nested oneofs,
repeated fields empty, small or far beyond their limit, long bytes. Hypercalls come from one
domain's vCPUs; its vCPUs have an upcall pending, so SCHEDOP_block and poll return at once
instead of sleeping out the call's deadline. Toolstack calls may destroy, pause or create
domains and start traces, and hypercalls may shut the domain down or take a vCPU down: each
example is undone before the next. EXAMPLES_PER_RPC keeps CI cheap; XENSIM_FUZZ_EXAMPLES runs
it longer.
"""

import os

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.server import start_server
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import toolstack_pb2 as t

from .helpers import WireGuest

EXAMPLES_PER_RPC = int(os.environ.get("XENSIM_FUZZ_EXAMPLES", "10"))
CALL_TIMEOUT = 2.0
HUGE = (1025, 4097, 20000)  # just past the Session and batch limits, and far past them
HUGE_BYTES = 4 << 20  # a huge list of big messages stays below the server's 16 MiB
NEVER = {grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]}
PTE = 0x67  # PRESENT | RW | USER | ACCESSED | DIRTY
METHODS = [*h.DESCRIPTOR.services_by_name["Hypercalls"].methods, *t.DESCRIPTOR.services_by_name["Toolstack"].methods]

pytestmark = pytest.mark.timeout(60 + 4 * EXAMPLES_PER_RPC)

# -- requests from descriptors ----------------------------------------------------------------

_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),  # proto3 enums are open
}
# Numbers that checks turn on: DOMID_SELF/IO/XEN/COW, the first ports and vCPUs, the 2-level
# ABI's ports, sign and width edges.
_EDGES = (0, 1, 2, 3, 4095, 4096, 0x7FF0, 0x7FF1, 0x7FF2, 0x7FF3, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Seven draws in eight from `good`: malformed input is tried at every level, yet most
    requests get as far as the core. (`st.one_of(*[good] * 7, bad)` does not weigh so:
    hypothesis draws the branch bad far more often.)"""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)


class Requests:
    """Strategies for any message of the contract, from its descriptor. `near` holds numbers
    of the fuzzed domain (its mfns, their machine addresses and PTEs, its virtual addresses),
    so that requests hit real frames; `overrides` replaces a field's strategy by full name."""

    def __init__(self, near: list[int], overrides: dict[str, st.SearchStrategy]):
        self.near = near
        self.overrides = overrides

    def integers(self, field: FieldDescriptor) -> st.SearchStrategy[int]:
        lo, hi = _RANGES[field.type]
        if field.type == FieldDescriptor.TYPE_ENUM:
            return mostly(st.sampled_from(sorted(set(field.enum_type.values_by_number) - {0})), st.integers(lo, hi))
        known = sorted({v for v in (*_EDGES, *self.near) if lo <= v <= hi})
        return st.one_of(st.sampled_from(known), st.integers(0, 64), st.integers(lo, hi))

    def scalar(self, field: FieldDescriptor) -> st.SearchStrategy:
        if field.type in _RANGES:
            return self.integers(field)
        if field.type == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if field.type == FieldDescriptor.TYPE_STRING:
            return st.text(max_size=24)
        if field.type == FieldDescriptor.TYPE_BYTES:
            return mostly(st.binary(max_size=64), st.sampled_from([b"", bytes(4096), bytes(4097), bytes(1 << 16)]))
        raise AssertionError(f"no strategy for {field.full_name} (type {field.type})")

    def value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy:
        if field.full_name in self.overrides:
            return self.overrides[field.full_name]
        if field.message_type is not None:
            return self.message(field.message_type, depth + 1)
        return self.scalar(field)

    def repeated(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[list]:
        """Mostly 1 to 3 elements; else none, or (near the top) one element copied far past
        every limit."""
        element = self.value(field, depth)
        some = st.lists(element, min_size=1, max_size=3)
        if depth > 1:
            return mostly(some, st.just([]))
        huge = st.tuples(element, st.sampled_from(HUGE)).map(lambda pair: [pair[0]] * _copies(pair[0], pair[1]))
        return mostly(some, st.one_of(st.just([]), huge))

    def field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy:
        """A scalar is always set (0 is among its values); an optional field (DOMID_SELF when
        unset) or a message field may stay unset."""
        if field.is_repeated:
            return self.repeated(field, depth)
        if field.has_presence:
            return st.one_of(st.none(), self.value(field, depth)) if field.message_type is None else mostly(self.value(field, depth), st.none())
        return self.value(field, depth)

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """Every field drawn (see `field`), each oneof mostly with a case, nesting cut off at
        depth 4 (deeper messages stay empty)."""
        cls = message_factory.GetMessageClass(descriptor)
        if depth > 4:
            return st.just(cls())
        real_oneofs = [o for o in descriptor.oneofs if not _is_synthetic(o)]
        in_oneof = {f.name for o in real_oneofs for f in o.fields}
        fields = {f.name: self.field(f, depth) for f in descriptor.fields if f.name not in in_oneof}
        cases = [mostly(st.one_of([st.tuples(st.just(f.name), self.value(f, depth)) for f in o.fields]), st.none()) for o in real_oneofs]

        def build(values: dict, chosen: tuple) -> Message:
            message = cls()
            for name, value in [*values.items(), *filter(None, chosen)]:
                if value is not None:
                    _assign(message, name, value)
            return message

        return st.builds(build, st.fixed_dictionaries(fields), st.tuples(*cases))


def _copies(element, wanted: int) -> int:
    """How many copies of element a huge list gets: `wanted`, unless that passes HUGE_BYTES."""
    size = element.ByteSize() if isinstance(element, Message) else 8
    return min(wanted, max(1, HUGE_BYTES // max(size, 1)))


def _is_synthetic(oneof) -> bool:
    """A proto3 `optional` field's oneof: the field alone, which may simply be unset."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _assign(message: Message, name: str, value) -> None:
    if isinstance(value, list):
        container = getattr(message, name)
        for item in value:
            container.add().CopyFrom(item) if isinstance(item, Message) else container.append(item)
    elif isinstance(value, Message):
        getattr(message, name).CopyFrom(value)
        getattr(message, name).SetInParent()  # an empty message still selects its oneof case
    else:
        setattr(message, name, value)


def bad_statuses(message: Message) -> list[status_pb2.Status]:
    """Every google.rpc.Status inside a response (CallResult, SessionResponse, multicall
    results) whose code is UNKNOWN or INTERNAL."""
    found, pending = [], [message]
    while pending:
        current = pending.pop()
        if isinstance(current, status_pb2.Status) and current.code in NEVER:
            found.append(current)
        for field, value in current.ListFields():
            if field.message_type is not None:
                pending.extend(value if field.is_repeated else [value])
    return found


# -- the machine under fuzz --------------------------------------------------------------------


class Target:
    """A server, one domain whose vCPUs the Hypercalls come from, and how to undo what a
    Toolstack example did."""

    def __init__(self, server, trace_dir: str):
        self.server = server
        self.trace_dir = trace_dir
        self.channel = server.channel()
        self.hc = server.hypercalls(self.channel)
        self.ts = server.toolstack(self.channel)
        self.guest = self._guest()

    def _guest(self) -> WireGuest:
        """A domain with both vCPUs running and an upcall pending on each (see the module
        docstring)."""
        guest = WireGuest(self.server, nr_pages=512, nr_vcpus=2)
        guest.bring_up(1)
        for vcpu in (0, 1):
            port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=vcpu))).port
            guest.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=port)))
        return guest

    def requests(self) -> Requests:
        """Numbers of the fuzzed domain to favour, and StartTrace kept inside a temporary
        directory (names without a slash, the directory itself, a NUL byte)."""
        g = self.guest
        pfns = [*range(g.start_info.first_free_pfn, g.start_info.first_free_pfn + 4), (g.start_info.pt_base - g.start_info.page_offset) >> 12]
        mfns = [*map(g.mfn, pfns), g.start_info.shared_info >> 12]
        near = [*mfns, *(mfn << 12 for mfn in mfns), *(mfn << 12 | PTE for mfn in mfns), *map(g.direct_va, pfns), g.start_info.mfn_list]
        names = st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), max_size=12)
        paths = st.one_of(names.map(lambda name: os.path.join(self.trace_dir, name)), st.just(self.trace_dir), st.just(os.path.join(self.trace_dir, "nul\0byte")))
        return Requests(near, {"xensim.v1.StartTraceRequest.path": paths})

    def restore(self) -> None:
        """Undo an example: stop tracing, unpause, destroy what it created, and bring back the
        fuzzed domain if it was destroyed, shut down or lost a vCPU (VCPUOP_down), since a
        vCPU that does not run makes no calls."""
        md = self.server.toolstack_metadata()
        self.ts.StopTrace(t.StopTraceRequest(), metadata=md, timeout=10)
        domains = self.ts.ListDomains(t.ListDomainsRequest(), metadata=md, timeout=10).domains
        running = False
        for domain in domains:
            stopped = domain.HasField("shutdown_reason") or domain.online_vcpus < domain.nr_vcpus
            if domain.domid != self.guest.domid or stopped:
                self.ts.DestroyDomain(t.DestroyDomainRequest(domid=domain.domid), metadata=md, timeout=10)
                continue
            running = True
            if domain.paused:
                self.ts.UnpauseDomain(t.UnpauseDomainRequest(domid=domain.domid), metadata=md, timeout=10)
        if not running:
            self.guest = self._guest()

    def call(self, method, request: Message, vcpu: int) -> list:
        """Send one fuzzed request; the bad statuses seen (the call's own, and inside its
        response)."""
        service = method.containing_service.name
        stub = self.hc if service == "Hypercalls" else self.ts
        metadata = self.guest.md(vcpu) if service == "Hypercalls" else self.server.toolstack_metadata()
        rpc = getattr(stub, method.name)
        try:
            if method.client_streaming:
                return [bad for response in rpc(iter(request), metadata=metadata, timeout=CALL_TIMEOUT) for bad in bad_statuses(response)]
            if method.server_streaming:
                return [bad for response in rpc(request, metadata=metadata, timeout=CALL_TIMEOUT / 4) for bad in bad_statuses(response)]
            return bad_statuses(rpc(request, metadata=metadata, timeout=CALL_TIMEOUT))
        except grpc.RpcError as error:
            return [error] if error.code().value[0] in NEVER else []

    def assert_healthy(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        assert self.server.process.poll() is None, "the server died"
        findings = self.ts.Audit(t.AuditRequest(), metadata=self.server.toolstack_metadata(), timeout=30).findings
        assert not findings, findings


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with start_server() as server:  # fails the module if the server logged a traceback or INTERNAL
        yield Target(server, str(tmp_path_factory.mktemp("traces")))


def _requests(method, requests: Requests) -> st.SearchStrategy:
    """A Session gets 1 to 3 messages on one stream; every other RPC one request."""
    request = requests.message(method.input_type)
    return st.lists(request, min_size=1, max_size=3) if method.client_streaming else request


@pytest.mark.parametrize("method", METHODS, ids=[f"{m.containing_service.name}.{m.name}" for m in METHODS])
def test_fuzzed_requests_never_break_the_server(target, method):
    @settings(max_examples=EXAMPLES_PER_RPC, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=_requests(method, target.requests()), vcpu=st.integers(0, 1))
    def example(request, vcpu):
        try:
            bad = target.call(method, request, vcpu)
        finally:
            target.restore()
        assert not bad, f"{method.name} answered {bad}"

    example()
    target.assert_healthy()


FIFO_OPS = ("init_control", "expand_array", "set_priority", "reset", "bind_ipi", "send", "unmask", "close")


def test_fuzzed_fifo_sequences_never_break_the_server(target):
    """The FIFO ABI's ops (docs/xen.md section 24) in sequences on one Session, drawn from
    their descriptors among the ops that bind, send and reset: a switch to FIFO on the
    domain's own frames, its event array and queues in use, and back."""
    requests = target.requests()
    ops = st.one_of(*(requests.message(h.EventChannelOpRequest.DESCRIPTOR.fields_by_name[op].message_type, 1).map(lambda m, op=op: (op, m)) for op in FIFO_OPS))
    calls = st.lists(ops.map(lambda pair: h.Call(event_channel_op=h.EventChannelOpRequest(**{pair[0]: pair[1]}))), min_size=1, max_size=8)
    session = hypercalls_method("Session")

    @settings(max_examples=4 * EXAMPLES_PER_RPC, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(calls.map(lambda c: h.SessionRequest(request_id=1, calls=c)), min_size=1, max_size=3), vcpu=st.integers(0, 1))
    def example(messages, vcpu):
        try:
            bad = target.call(session, [h.SessionRequest(request_id=i + 1, calls=m.calls) for i, m in enumerate(messages)], vcpu)
        finally:
            target.restore()
        assert not bad, f"Session answered {bad}"

    example()
    target.assert_healthy()


def hypercalls_method(name: str):
    return h.DESCRIPTOR.services_by_name["Hypercalls"].methods_by_name[name]


def test_nul_in_a_trace_path_is_einval(target):
    """A regression the fuzzer found: open() raises ValueError, not OSError, for a NUL byte."""
    with pytest.raises(grpc.RpcError) as caught:
        target.ts.StartTrace(t.StartTraceRequest(path=os.path.join(target.trace_dir, "a\0b")), metadata=target.server.toolstack_metadata(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "EINVAL" in caught.value.details()
