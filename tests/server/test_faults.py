"""Faults: a vCPU process SIGKILLed mid-batch, mid-stream, while a big answer is being sent, or
asleep in SCHEDOP_block or poll. The server ends its stream, keeps the vCPU's state, accepts a
new Session for the vCPU from a new process, which goes on; nothing leaks (audit clean, the
domain's frames as they were, every frame freed when the domain is destroyed).

One table, KILLS: where the process is when it dies (the message it repeats, how many it keeps
in flight) and how the test knows it got there.
"""

import json
import select
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from tests.support.server import start_server
from xensim.launch import python, python_command, started
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import RW, A, D, P, WireGuest

pytestmark = pytest.mark.timeout(120)

ENTRIES = 64  # entries of the pinned L1 that each mid-batch mmu_update remaps
HELD = ("initialised", "online", "blocked", "kernel_cr3_mfn", "user_cr3_mfn")  # what a death must not change


@dataclass
class Domain:
    """A domain with what the messages need: a pinned L1 whose ENTRIES entries map one set of
    pages, a second set, and an IPI port that notifies vCPU 0."""

    guest: WireGuest
    l1: int
    sets: tuple[list[int], list[int]]
    port: int

    @classmethod
    def build(cls, server) -> "Domain":
        guest = WireGuest(server, nr_pages=1024, nr_vcpus=2)
        guest.bring_up(1)  # vCPU 1 wakes vCPU 0 and reads its frames while it sleeps
        sets = tuple([guest.alloc()[1] for _ in range(ENTRIES)] for _ in range(2))
        _, l1 = guest.pinned_table(1, {i: mfn << 12 | P | RW | A | D for i, mfn in enumerate(sets[0])})
        port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=0)), vcpu=1).port
        return cls(guest, l1, sets, port)

    def remap(self, to: int) -> h.Call:
        reqs = [h.MmuUpdate(ptr=(self.l1 << 12) + 8 * i, val=mfn << 12 | P | RW | A | D) for i, mfn in enumerate(self.sets[to])]
        return h.Call(mmu_update=h.MmuUpdateRequest(reqs=reqs))

    def vcpu0(self) -> t.Vcpu:
        return self.guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=self.guest.domid, vcpu=0)).vcpus[0]

    def wake(self) -> None:
        """An event for vCPU 0, sent by vCPU 1 (vCPU 0's own calls wait while it sleeps)."""
        self.guest.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=self.port)), vcpu=1)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Kill:
    where: str
    message: Callable[[Domain], list[h.Call]]
    depth: int = 1

    @property
    def sleeps(self) -> bool:
        return self.where.startswith("asleep")


MID_STREAM = Kill("mid-stream", lambda d: [h.Call(store=m.StoreRequest(va=d.guest.direct_va(d.guest.next_pfn), size=8, value=7)), h.Call(xen_version=h.XenVersionRequest())], depth=8)
KILLS = [
    # Each message remaps all entries away and back: whole messages leave the frames as they were.
    Kill("mid-batch", lambda d: [d.remap(1), d.remap(0)] * 8, depth=2),
    MID_STREAM,
    Kill("while 4 MiB answers are sent", lambda d: [h.Call(read=m.ReadRequest(va=d.guest.direct_va(d.guest.next_pfn), length=4096))] * 1024, depth=2),
    Kill("asleep in SCHEDOP_block", lambda d: [h.Call(sched_op=h.SchedOpRequest(block=h.SchedBlock()))]),
    Kill("asleep in SCHEDOP_poll", lambda d: [h.Call(sched_op=h.SchedOpRequest(poll=h.SchedPoll(ports=[d.port])))]),
]


class VcpuProcess:
    """tests/server/vcpu_process.py as vCPU 0 of the domain, repeating one message."""

    def __init__(self, stack: ExitStack, server, domain: Domain, kill: Kill, count: int):
        message = h.SessionRequest(calls=kill.message(domain)).SerializeToString().hex()
        command = python_command("tests.server.vcpu_process", server.address, domain.guest.token, "0", message, str(kill.depth), str(count))
        self.child = stack.enter_context(started(command))

    def event(self, timeout: float = 30.0) -> str:
        ready, _, _ = select.select([self.child.process.stdout], [], [], timeout)
        assert ready, f"the vCPU process said nothing within {timeout} s"
        line = self.child.process.stdout.readline()
        assert line, f"the vCPU process ended ({self.child.process.wait()}): {self.child.log()}"
        return json.loads(line)["event"]

    def finish(self) -> dict:
        out = self.child.finish(60)
        assert self.child.process.returncode == 0, self.child.log()
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        self.child.stop(signal.SIGKILL)


def reach(process: VcpuProcess, domain: Domain, kill: Kill) -> None:
    """Wait until the process is where `kill` says (asleep: the vCPU blocked in Xen)."""
    assert process.event() == ("sleeping" if kill.sleeps else "running")
    if kill.sleeps:
        wait_until(lambda: domain.vcpu0().blocked, "vCPU 0 is blocked")
    else:
        time.sleep(0.2)  # let messages keep flowing, so the kill lands among them


@pytest.fixture
def processes():
    """Where a test's processes are started: each is stopped when the test ends, passed or not."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture(scope="module")
def server():
    with start_server() as running:  # fails the module if the server logged a traceback or INTERNAL
        yield running


@pytest.mark.parametrize("kill", KILLS, ids=[k.where for k in KILLS])
def test_a_killed_vcpu_process_is_cleaned_up_and_a_new_one_goes_on(server, processes, kill):
    domain = Domain.build(server)
    guest = domain.guest
    runs = guest.frame_runs(vcpu=1)
    frames = guest.frames(runs)

    first = VcpuProcess(processes, server, domain, kill, count=0)
    reach(first, domain, kill)
    held = domain.vcpu0()
    first.kill()
    wait_until(lambda: not domain.vcpu0().session_open, "the server ends the dead process's stream")
    after = domain.vcpu0()
    assert [getattr(after, f) for f in HELD] == [getattr(held, f) for f in HELD]
    assert not guest.toolstack("Audit", t.AuditRequest()).findings

    second = VcpuProcess(processes, server, domain, kill, count=1 if kill.sleeps else 20)  # the same vCPU, a new process
    if kill.sleeps:
        reach(second, domain, kill)
        domain.wake()
    assert second.finish()["messages"] == (1 if kill.sleeps else 20)
    wait_until(lambda: not domain.vcpu0().session_open, "the stream of the finished process is gone")
    assert not domain.vcpu0().blocked
    assert guest.frames(runs) == frames
    assert not guest.toolstack("Audit", t.AuditRequest()).findings
    freed = guest.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=guest.domid)).freed_frames
    assert freed == guest.start_info.nr_pages + 1  # every page and the shared-info frame
    assert not guest.toolstack("Audit", t.AuditRequest()).findings


STALLED_CLIENT = """
import sys, time, grpc
from xensim.v1 import hypercalls_pb2 as h, hypercalls_pb2_grpc, memory_pb2 as m
address, token, va = sys.argv[1], sys.argv[2], int(sys.argv[3])
reads = [h.Call(read=m.ReadRequest(va=va, length=4096))] * 1024
stub = hypercalls_pb2_grpc.HypercallsStub(grpc.insecure_channel(address))
call = stub.Session(iter([h.SessionRequest(request_id=i, calls=reads) for i in range(1, 5)]), metadata=(("authorization", "Bearer " + token), ("x-xen-vcpu", "0")))
print("sent", flush=True)
time.sleep(60)
"""


def test_a_client_killed_while_the_server_waits_to_write_its_answer_is_no_internal_error(server, processes):
    """Regression: 4 MiB answers to a client that reads none of them fill the stream's window,
    so the server is inside context.write when the client dies; grpc then fails the write
    before it cancels the handler, which used to log INTERNAL and make the server exit 1."""
    domain = Domain.build(server)
    va = domain.guest.direct_va(domain.guest.next_pfn)
    stalled = processes.enter_context(started(python("-c", STALLED_CLIENT, server.address, domain.guest.token, str(va))))
    assert stalled.process.stdout.readline().strip() == "sent", stalled.log()
    wait_until(lambda: domain.vcpu0().session_open, "the Session is open")
    time.sleep(0.5)  # the first answers fill the window; the server waits in write
    stalled.stop(signal.SIGKILL)
    wait_until(lambda: not domain.vcpu0().session_open, "the server ends the dead client's stream")
    assert "INTERNAL" not in server.stderr()
    assert VcpuProcess(processes, server, domain, MID_STREAM, count=3).finish()["messages"] == 3


DYING_CLIENT = """
import sys, time, grpc
from xensim.v1 import hypercalls_pb2 as h, hypercalls_pb2_grpc, memory_pb2 as m
address, token, l1, mfns, marks, flips, poll = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(a) for a in sys.argv[4:6]], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
flip = h.Call(mmu_update=h.MmuUpdateRequest(reqs=[h.MmuUpdate(ptr=l1 << 12, val=mfn << 12 | 0x63) for mfn in mfns] * 2048))
mark = lambda i: h.Call(store=m.StoreRequest(va=marks + 8 * i, size=8, value=1))
sleep = [h.Call(sched_op=h.SchedOpRequest(poll=h.SchedPoll(ports=[int(poll)])))] if poll != "-" else []
calls = [mark(0), *[flip] * flips, mark(1), *[flip] * flips, *sleep, mark(2)]
def requests():
    yield h.SessionRequest(request_id=1, calls=calls)
    time.sleep(60)
stub = hypercalls_pb2_grpc.HypercallsStub(grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]))
call = stub.Session(requests(), metadata=(("authorization", "Bearer " + token), ("x-xen-vcpu", "0")))
print("sent", flush=True)
time.sleep(60)
"""
FLIPS = 16  # mmu_updates of 4,096 entries in each half of the message: hundreds of preemption points


@pytest.mark.parametrize("sleeps", [False, True], ids=["whole", "up to its poll"])
def test_a_message_runs_on_when_its_process_dies_at_a_preemption_point(server, processes, sleeps):
    """Regression (stress --kill-vcpus, free run: "pin as L4: mfn 0x7b0 has type WRITABLE"): a
    message gives way to other calls every PREEMPT_WORK, and grpc cancels the handler of a
    process that died at the next await, which dropped the rest of the message there. The guest
    kernel relies on a message running whole (its page pool is written at the message's end,
    after the calls that use the pages), so a restarted vCPU took pages the half-run message had
    mapped. Now the message runs to its end, or to the call where the vCPU sleeps (and stays
    asleep, as a killed sleeper does); its vCPU is free for a new process meanwhile. The
    message marks its start, its middle and its end; the process dies after the middle, while
    its second half runs."""
    domain = Domain.build(server)
    guest = domain.guest
    marks = guest.direct_va(guest.next_pfn)
    mfns = [domain.sets[1][0], domain.sets[0][0]]  # entry 0 maps the first, then what it mapped, 2,048 times a call
    runs = guest.frame_runs(vcpu=1)
    frames = guest.frames(runs)
    args = [server.address, guest.token, str(domain.l1), *map(str, mfns), str(marks), str(FLIPS), str(domain.port) if sleeps else "-"]
    client = processes.enter_context(started(python("-c", DYING_CLIENT, *args)))
    assert client.process.stdout.readline().strip() == "sent", client.log()

    def mark(i: int) -> int:
        return guest.call("Load", m.LoadRequest(va=marks + 8 * i, size=8), vcpu=1).value

    wait_until(lambda: mark(1), "the message is halfway")
    client.stop(signal.SIGKILL)
    wait_until(lambda: not domain.vcpu0().session_open, "the server frees the vCPU for a new process")
    wait_until(lambda: domain.vcpu0().blocked if sleeps else mark(2), "the message runs on to its poll or its end")
    assert (mark(0), mark(1), mark(2)) == (1, 1, 0 if sleeps else 1)
    assert domain.vcpu0().blocked == sleeps
    assert guest.frames(runs) == frames  # entry 0 of the L1 maps what it mapped before
    assert not guest.toolstack("Audit", t.AuditRequest()).findings


NEXT_CLIENT = """
import sys, grpc
from xensim.v1 import hypercalls_pb2 as h, hypercalls_pb2_grpc, memory_pb2 as m
address, token, va = sys.argv[1], sys.argv[2], int(sys.argv[3])
channel = grpc.insecure_channel(address)
request = h.SessionRequest(request_id=1, calls=[h.Call(load=m.LoadRequest(va=va, size=8))])
call = hypercalls_pb2_grpc.HypercallsStub(channel).Session(iter([request]), metadata=(("authorization", "Bearer " + token), ("x-xen-vcpu", "0")))
try:
    print(next(r for r in call if r.request_id == 1).results[0].load.value, flush=True)
except grpc.RpcError as error:
    print(error.code().name, flush=True)
channel.close()  # a stream left open held the interpreter's exit past the test's timeout, now and then
"""


def completed(guest: WireGuest, op: str) -> int:
    """How many `op` calls the server has run to their end (Stats)."""
    return sum(c.count for c in guest.toolstack("Stats", t.StatsRequest()).counts if c.op == op)


@pytest.mark.parametrize("then", ["unpause", "destroy"])
def test_a_message_runs_on_when_its_process_dies_while_its_domain_is_paused(server, processes, then):
    """Regression (docs/transport.md section 8): a message stopped at a preemption point while
    the toolstack paused its domain waits there for the unpause, and grpc cancelled that wait
    when the process died, cutting the message as a give-way did before. In Xen the paused
    vCPU's hypercall goes on when the domain is unpaused. Now the message goes on after the
    unpause, to its end, and its vCPU is free for a new process meanwhile, whose message runs
    only after the dead one's (it loads the last mark the dead message stores); a DestroyDomain
    meanwhile ends both at once. The process dies in the message's second half: the test pauses
    the domain there (Stats shows it stopped between its marks), then kills it."""
    flips = 4 * FLIPS  # a second half long enough for the pause to land in it
    domain = Domain.build(server)
    guest = domain.guest
    marks = guest.direct_va(guest.next_pfn)
    runs = guest.frame_runs(vcpu=1)
    frames = guest.frames(runs)
    stores, updates = completed(guest, "store"), completed(guest, "mmu_update")
    args = [server.address, guest.token, str(domain.l1), str(domain.sets[1][0]), str(domain.sets[0][0]), str(marks), str(flips), "-"]
    client = processes.enter_context(started(python("-c", DYING_CLIENT, *args)))
    assert client.process.stdout.readline().strip() == "sent", client.log()
    wait_until(lambda: guest.call("Load", m.LoadRequest(va=marks + 8, size=8), vcpu=1).value, "the message is halfway")
    guest.toolstack("PauseDomain", t.PauseDomainRequest(domid=guest.domid))
    assert completed(guest, "store") - stores == 2  # marks 0 and 1: the last one waits
    assert completed(guest, "mmu_update") - updates < 2 * flips, "the message ended before the pause"
    client.stop(signal.SIGKILL)
    wait_until(lambda: not domain.vcpu0().session_open, "the dead process's Session is gone")

    following = processes.enter_context(started(python("-c", NEXT_CLIENT, server.address, guest.token, str(marks + 16))))
    wait_until(lambda: domain.vcpu0().session_open, "a new process opened the vCPU's Session")
    over = f"dom{guest.domid} vCPU 0: the message of its dead process is over"  # Runtime.detach's log

    def ended() -> int:
        return server.stderr().count(over)

    before = ended()
    time.sleep(0.2)
    assert ended() == before, "the dead process's message ended while its domain is paused"
    if then == "destroy":
        freed = guest.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=guest.domid)).freed_frames
        assert freed == guest.start_info.nr_pages + 1  # every page and the shared-info frame
        assert following.finish(10).strip() == "ABORTED"
        wait_until(lambda: ended() > before, "DestroyDomain ends the dead process's message")
        assert not guest.toolstack("Audit", t.AuditRequest()).findings
        return
    guest.toolstack("UnpauseDomain", t.UnpauseDomainRequest(domid=guest.domid))
    assert following.finish(10).strip() == "1", "the dead process's message did not run to its end before the new process's"
    wait_until(lambda: ended() > before, "the dead process's message is over")
    assert completed(guest, "store") - stores == 3
    assert guest.frames(runs) == frames  # the message's flips ran whole
    assert not guest.toolstack("Audit", t.AuditRequest()).findings
