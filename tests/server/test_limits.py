"""Every limit of the server: a use at the limit works, one past it fails with an error that
names the limit, and README's Limits table states the same number as the code.

One table, LIMITS: each row is what is limited, its value (from the code), a use exactly at
the limit (None where that is the normal case or would take the machine), a use one past it,
and the gRPC code and words of the error that use must get.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hypervisor.core.abi import EVTCHN_2L_NR_CHANNELS, MAX_BATCH, MAX_VCPUS, PAGE_SIZE
from hypervisor.core.domain import MIN_PAGES
from hypervisor.core.evtchn import LIBXL_MAX_EVTCHN_PORT
from hypervisor.core.hypervisor import MAX_DOMAINS, RESERVED_FRAMES
from hypervisor.core.schedop import MAX_POLL_PORTS
from hypervisor.server.app import SERVER_OPTIONS
from hypervisor.server.convert import MAX_FRAME_INFO, MAX_SESSION_CALLS
from hypervisor.server.tracing import READER_BACKLOG_BYTES
from tests.support.server import TEST_FRAMES, start_server
from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, WireGuest

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_MESSAGE = dict(SERVER_OPTIONS)["grpc.max_receive_message_length"]
Refusal = tuple[str, str]  # the gRPC code's name and the message
ECHO = h.Call(echo=h.EchoRequest())
ALLOC_UNBOUND = h.Call(event_channel_op=h.EventChannelOpRequest(alloc_unbound=h.EvtchnAllocUnbound()))


def refused(fn: Callable) -> Refusal:
    with pytest.raises(grpc.RpcError) as caught:
        fn()
    return caught.value.code().name, caught.value.details()


class Machine:
    """The server and one domain (2 vCPUs, 2048 pages) whose vCPU 0 makes the unary calls
    and vCPU 1 the Session messages."""

    def __init__(self, server):
        self.server = server
        self.guest = WireGuest(server)
        self.guest.bring_up(1)
        self.page = self.guest.alloc()[1]

    def call(self, rpc: str, request):
        return self.guest.call(rpc, request)

    def toolstack(self, rpc: str, request):
        return self.guest.toolstack(rpc, request)

    def unary(self, rpc: str, request) -> Refusal:
        return refused(lambda: self.call(rpc, request))

    def create(self, **request) -> Refusal:
        return refused(lambda: self.server.create_domain(**request))

    def session_message(self, calls: int, call: h.Call = ECHO) -> h.SessionResponse:
        """One Session message of `calls` copies of `call` (on vCPU 1: vCPU 0 makes unary calls)."""
        session = SessionClient(self.guest.hc, self.guest.md(1))
        try:
            session.send(1, *[call] * calls)
            return session.answer()
        finally:
            session.close()

    def message_refused(self, calls: int) -> Refusal:
        status = self.session_message(calls).status
        return next(c.name for c in grpc.StatusCode if c.value[0] == status.code), status.message

    def fill_ports(self) -> None:
        """Bind every port up to the domain's max_evtchn_port (1023), in one message."""
        answer = self.session_message(LIBXL_MAX_EVTCHN_PORT, ALLOC_UNBOUND)
        assert [r.event_channel_op.port for r in answer.results] == list(range(1, LIBXL_MAX_EVTCHN_PORT + 1))

    def pending_port(self) -> int:
        port = self.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=1))).port
        self.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=port)))
        return port

    def free_frames(self) -> int:
        """Machine frames that no domain holds: each has its pages and a shared-info frame."""
        domains = self.toolstack("ListDomains", t.ListDomainsRequest()).domains
        return TEST_FRAMES - RESERVED_FRAMES - sum(d.nr_pages + 1 for d in domains)

    def fill_domains(self) -> None:
        """Create the smallest domains until the machine holds MAX_DOMAINS."""
        for _ in range(MAX_DOMAINS - len(self.toolstack("ListDomains", t.ListDomainsRequest()).domains)):
            self.server.create_domain(nr_pages=MIN_PAGES, nr_vcpus=1)

    def destroy_all_but_mine(self) -> None:
        for domain in self.toolstack("ListDomains", t.ListDomainsRequest()).domains:
            if domain.domid != self.guest.domid:
                self.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=domain.domid))

    def echo(self, size: int):
        channel = grpc.insecure_channel(self.server.address, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        try:
            return self.server.hypercalls(channel).Echo(h.EchoRequest(payload=bytes(size)), metadata=self.guest.md(0), timeout=30)
        finally:
            channel.close()

    def second_session(self) -> Refusal:
        first = SessionClient(self.guest.hc, self.guest.md(1))
        try:
            first.send(1, h.Call(echo=h.EchoRequest()))
            first.answer()
            end = SessionClient(self.guest.hc, self.guest.md(1)).end()
            return end.code().name, end.details()
        finally:
            first.close()

    def lagging_trace_reader(self) -> Refusal:
        """A StreamTrace reader that reads nothing while the machine makes twice as many bytes
        of trace lines as its backlog holds (page writes, each 8 KiB of hex), then reads on."""
        lines = self.server.toolstack().StreamTrace(t.StreamTraceRequest(), timeout=60)
        session = SessionClient(self.guest.hc, self.guest.md(0))
        write = h.Call(write=m.WriteRequest(va=page_va(self), data=bytes(PAGE_SIZE)))
        for request_id in range(1, 2 * READER_BACKLOG_BYTES // (2 * PAGE_SIZE * MAX_SESSION_CALLS) + 1):
            session.send(request_id, *[write] * MAX_SESSION_CALLS)
            session.answer()
        session.close()
        return refused(lambda: sum(1 for _ in lines))


def mmu_updates(machine: Machine, n: int) -> h.MmuUpdateRequest:
    """n plain writes into the domain's own page."""
    return h.MmuUpdateRequest(reqs=[h.MmuUpdate(ptr=(machine.page << 12) + 8 * (i % 512), val=i) for i in range(n)])


def flushes(n: int) -> h.MmuextOpRequest:
    return h.MmuextOpRequest(ops=[h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_TLB_FLUSH_LOCAL)] * n)


def versions(n: int) -> h.MulticallRequest:
    return h.MulticallRequest(entries=[h.MulticallEntry(xen_version=h.XenVersionRequest())] * n)


def poll(machine: Machine, n: int) -> h.SchedOpRequest:
    return h.SchedOpRequest(poll=h.SchedPoll(ports=[machine.pending_port()] * n))


def page_va(machine: Machine) -> int:
    return machine.guest.direct_va(machine.guest.next_pfn - 1)


@dataclass(frozen=True)
class Limit:
    what: str
    value: int | str
    at: Callable[[Machine], object] | None
    over: Callable[[Machine], Refusal]
    code: str
    says: str


LIMITS = [
    Limit("mmu_update requests per call", MAX_BATCH, lambda x: x.call("MmuUpdate", mmu_updates(x, MAX_BATCH)), lambda x: x.unary("MmuUpdate", mmu_updates(x, MAX_BATCH + 1)), "INVALID_ARGUMENT", "reqs: 4097 entries; 0 to 4096"),
    Limit("mmuext_op ops per call", MAX_BATCH, lambda x: x.call("MmuextOp", flushes(MAX_BATCH)), lambda x: x.unary("MmuextOp", flushes(MAX_BATCH + 1)), "INVALID_ARGUMENT", "ops: 4097 entries; 0 to 4096"),
    Limit("multicall entries per call", MAX_BATCH, lambda x: x.call("Multicall", versions(MAX_BATCH)), lambda x: x.unary("Multicall", versions(MAX_BATCH + 1)), "INVALID_ARGUMENT", "entries: 4097 entries; 0 to 4096"),
    Limit("calls per Session message", MAX_SESSION_CALLS, lambda x: x.session_message(MAX_SESSION_CALLS), lambda x: x.message_refused(MAX_SESSION_CALLS + 1), "INVALID_ARGUMENT", "calls: 1025 calls; 1 to 1024 per message"),
    Limit("ports per SCHEDOP_poll", MAX_POLL_PORTS, lambda x: x.call("SchedOp", poll(x, MAX_POLL_PORTS)), lambda x: x.unary("SchedOp", poll(x, MAX_POLL_PORTS + 1)), "FAILED_PRECONDITION", "EINVAL (22): poll of 129 ports: at most 128"),
    Limit("bytes per Read", PAGE_SIZE, lambda x: x.call("Read", m.ReadRequest(va=page_va(x), length=PAGE_SIZE)), lambda x: x.unary("Read", m.ReadRequest(va=page_va(x), length=PAGE_SIZE + 1)), "INVALID_ARGUMENT", "length: 4097 bytes"),
    Limit("bytes per Write", PAGE_SIZE, lambda x: x.call("Write", m.WriteRequest(va=page_va(x), data=bytes(PAGE_SIZE))), lambda x: x.unary("Write", m.WriteRequest(va=page_va(x), data=bytes(PAGE_SIZE + 1))), "INVALID_ARGUMENT", "data: 4097 bytes"),
    Limit("frames per FrameInfo", MAX_FRAME_INFO, lambda x: x.toolstack("FrameInfo", t.FrameInfoRequest(count=MAX_FRAME_INFO)), lambda x: refused(lambda: x.toolstack("FrameInfo", t.FrameInfoRequest(count=MAX_FRAME_INFO + 1))), "INVALID_ARGUMENT", "count: 4097 frames; at most 4096"),
    Limit("bytes per gRPC message to the server", MAX_MESSAGE, lambda x: x.echo(MAX_MESSAGE - 64), lambda x: refused(lambda: x.echo(MAX_MESSAGE + 1)), "RESOURCE_EXHAUSTED", "larger than max"),
    Limit("domains", MAX_DOMAINS, lambda x: x.fill_domains(), lambda x: x.create(nr_pages=MIN_PAGES, nr_vcpus=1), "RESOURCE_EXHAUSTED", "ENOSPC (28): the machine already runs 256 domains"),
    Limit("vCPUs per domain", MAX_VCPUS, lambda x: x.server.create_domain(nr_pages=64, nr_vcpus=MAX_VCPUS), lambda x: x.create(nr_pages=64, nr_vcpus=MAX_VCPUS + 1), "FAILED_PRECONDITION", "EINVAL (22): nr_vcpus 33 is outside 1..32"),
    Limit("pages per domain, at least", MIN_PAGES, lambda x: x.server.create_domain(nr_pages=MIN_PAGES, nr_vcpus=1), lambda x: x.create(nr_pages=MIN_PAGES - 1, nr_vcpus=1), "FAILED_PRECONDITION", "EINVAL (22): nr_pages 15 (highmem 0) is below 16"),
    Limit("pages per domain, at most", "the machine's free frames less one",  lambda x: x.server.create_domain(nr_pages=x.free_frames() - 1, nr_vcpus=1), lambda x: x.create(nr_pages=MIN_PAGES, nr_vcpus=1), "RESOURCE_EXHAUSTED", "ENOMEM (12): 17 frames wanted, 0 free"),
    Limit("max_evtchn_port", EVTCHN_2L_NR_CHANNELS - 1, lambda x: x.server.create_domain(nr_pages=64, nr_vcpus=1, max_evtchn_port=EVTCHN_2L_NR_CHANNELS - 1), lambda x: x.create(nr_pages=64, nr_vcpus=1, max_evtchn_port=EVTCHN_2L_NR_CHANNELS), "FAILED_PRECONDITION", "EINVAL (22): max_evtchn_port 4096 is outside 0..4095"),
    Limit("ports in use per domain (max_evtchn_port, by default)", LIBXL_MAX_EVTCHN_PORT, lambda x: x.fill_ports(), lambda x: x.unary("EventChannelOp", ALLOC_UNBOUND.event_channel_op), "RESOURCE_EXHAUSTED", "ENOSPC (28): dom"),
    Limit("Session streams per vCPU", 1, None, lambda x: x.second_session(), "ALREADY_EXISTS", "already has a Session open"),
    Limit("StreamTrace bytes a reader may fall behind", READER_BACKLOG_BYTES, None, lambda x: x.lagging_trace_reader(), "RESOURCE_EXHAUSTED", "trace reader fell more than 16 MiB behind"),
]


@pytest.fixture(scope="module")
def server():
    with start_server() as running:
        yield running


@pytest.fixture
def machine(server):
    machine = Machine(server)
    yield machine
    machine.destroy_all_but_mine()
    machine.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=machine.guest.domid))
    assert not machine.toolstack("Audit", t.AuditRequest()).findings


@pytest.mark.parametrize("limit", LIMITS, ids=[row.what for row in LIMITS])
def test_at_the_limit_works_and_past_it_the_error_names_it(machine, limit):
    if limit.at is not None:
        limit.at(machine)
    code, message = limit.over(machine)
    assert code == limit.code and limit.says in message, (code, message)
    assert machine.toolstack("Audit", t.AuditRequest()).findings == []


def test_readme_states_the_limits_of_the_code():
    """README's Limits table has a row for each LIMITS row, `| what | value ... |`."""
    section = README.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    stated = {cells[1].strip(): cells[2] for cells in (line.split("|") for line in section.splitlines()) if len(cells) > 3}
    for limit in LIMITS:
        assert str(limit.value) in stated.get(limit.what, ""), f"README's Limits table should give {limit.what}: {limit.value}"
