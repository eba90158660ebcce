"""What clients may hold of the server: connections, calls and streams, and Sessions whose
process hangs or whose network path vanished. Each limit is tried over loopback with short
values (`serve` flags), and README's Limits table states the defaults of the code."""

import queue
import resource
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from hypervisor.__main__ import main as hypervisor_main
from hypervisor.server.app import FD_RESERVE, _connection_options
from hypervisor.server.config import Connections
from tests.support.server import start_server
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import hypercalls_pb2_grpc
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, WireGuest, error_info, status_of

pytestmark = pytest.mark.timeout(90)

README = Path(__file__).resolve().parents[2] / "README.md"
ECHO = h.Call(echo=h.EchoRequest())
# The client side of an HTTP/2 handshake (RFC 9113 3.4): the preface, an empty SETTINGS frame,
# and the ACK of the server's SETTINGS. Nothing else follows: no call, ever.
HTTP2_HANDSHAKE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000") + bytes.fromhex("000000040100000000")


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition()` holds; the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed this connection (reads what it sent, e.g. SETTINGS and GOAWAY)."""
    try:
        while data := sock.recv(65536, socket.MSG_DONTWAIT):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def session_open(guest: WireGuest, vcpu: int) -> bool:
    (info,) = guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid, vcpu=vcpu)).vcpus
    return info.session_open


def echoes(session: SessionClient, request_id: int) -> bool:
    session.send(request_id, ECHO)
    return session.answer().request_id == request_id


class SilentPath:
    """A TCP relay between a client and the server whose path can vanish: after `cut()` it
    forwards nothing more either way but keeps both connections open, as a pulled cable or a
    NAT that forgot the flow does. Neither end hears anything, not even a close."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarding = True
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        while self.forwarding:
            try:
                data = source.recv(65536)
                if not data or not self.forwarding:
                    return
                sink.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        self.forwarding = False

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_idle_connections_are_closed_after_the_idle_timeout_and_those_past_the_limit_at_once():
    """1,124 handshake-only connections once used up the server's file descriptors and were
    still held 150 s later, locking everyone out."""
    with start_server("--max-connections", "16", "--idle-timeout", "2") as server:
        guest = WireGuest(server)
        working = SessionClient(guest.hc, guest.md(0))  # a client that was there first
        assert echoes(working, 1)
        host, port = server.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(40)]
        for sock in idle:
            sock.sendall(HTTP2_HANDSHAKE)
        # Past the limit (the working client's connection is one of the 16): closed as they arrive.
        eventually(lambda: sum(map(closed_by_peer, idle)) >= 40 - 15, 1.5, "connections past the limit closed")
        assert echoes(working, 2)  # a connection with a call open is not idle
        # A new client (its own connection) is served once the idle ones are gone.
        start = time.monotonic()
        channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        domains = server.toolstack(channel).ListDomains(t.ListDomainsRequest(), wait_for_ready=True, timeout=20).domains
        assert [d.domid for d in domains] == [guest.domid] and time.monotonic() - start < 2 + 8
        eventually(lambda: all(map(closed_by_peer, idle)), 1, "every idle connection closed")
        assert echoes(working, 3)
        channel.close()
        working.close()
        for sock in idle:
            sock.close()


def test_a_session_whose_network_path_vanished_ends_after_the_keepalive_timeout():
    """A client that vanished without a close kept its vCPU's Session for good: every new
    Session got ALREADY_EXISTS, so no other process could claim the vCPU."""
    with start_server("--keepalive", "1", "--keepalive-timeout", "1") as server:
        guest = WireGuest(server)
        path = SilentPath(server.address)
        channel = grpc.insecure_channel(path.address)
        vanished = SessionClient(hypercalls_pb2_grpc.HypercallsStub(channel), guest.md(0))
        try:
            assert echoes(vanished, 1) and session_open(guest, 0)
            path.cut()
            took = eventually(lambda: not session_open(guest, 0), 10, "the vanished client's Session ended")
            claimed = SessionClient(guest.hc, guest.md(0))  # another process claims the vCPU
            assert echoes(claimed, 1) and session_open(guest, 0)
            claimed.close()
        finally:
            vanished.close()
            path.close()
            channel.close()
    assert took < 1 + 1 + 3


def test_detach_session_frees_the_vcpu_at_once_even_while_its_call_sleeps(server):
    guest = WireGuest(server)
    held = SessionClient(guest.hc, guest.md(0))
    assert held.push().HasField("started")
    held.send(1, h.Call(sched_op=h.SchedOpRequest(block=h.SchedBlock())))  # no event: sleeps
    eventually(lambda: guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid, vcpu=0)).vcpus[0].blocked, 5, "vCPU 0 asleep")

    detached = guest.toolstack("DetachSession", t.DetachSessionRequest(domid=guest.domid, vcpu=0))
    claimed = SessionClient(guest.hc, guest.md(0))  # at once: no ALREADY_EXISTS, no retry
    assert detached.detached and echoes(claimed, 1)
    end = held.end()
    assert end.code() == grpc.StatusCode.ABORTED and "detached by the toolstack" in end.details(), end
    assert session_open(guest, 0)
    claimed.close()

    assert not guest.toolstack("DetachSession", t.DetachSessionRequest(domid=guest.domid, vcpu=1)).detached
    for request, errno in ((t.DetachSessionRequest(domid=guest.domid + 1, vcpu=0), "ESRCH"), (t.DetachSessionRequest(domid=guest.domid, vcpu=2), "ENOENT")):
        with pytest.raises(grpc.RpcError) as caught:
            guest.toolstack("DetachSession", request)
        assert error_info(status_of(caught.value)).reason == errno


def test_calls_past_the_servers_limit_are_resource_exhausted_and_served_again_below_it():
    with start_server("--max-calls", "3") as server:
        guest = WireGuest(server, nr_vcpus=3)
        sessions = [SessionClient(guest.hc, guest.md(vcpu)) for vcpu in range(3)]
        assert all(echoes(session, 1) for session in sessions)
        with pytest.raises(grpc.RpcError) as caught:
            guest.call("XenVersion", h.XenVersionRequest())
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        sessions.pop().close()

        def served() -> bool:
            try:
                return guest.call("XenVersion", h.XenVersionRequest()).major > 0
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                return False

        eventually(served, 5, "served again once a Session ended")
        for session in sessions:
            session.close()


def test_streams_past_a_connections_limit_wait_in_the_client_until_one_ends():
    """--max-streams bounds what one connection has in flight (with the message size limit,
    its memory): a third Session on a connection that allows two is not served until one ends."""
    with start_server("--max-streams", "2") as server:
        guest = WireGuest(server, nr_vcpus=3)
        first, second = (SessionClient(guest.hc, guest.md(vcpu)) for vcpu in (0, 1))
        assert echoes(first, 1) and echoes(second, 1)
        third = SessionClient(guest.hc, guest.md(2))  # the same connection: the process shares it
        third.send(1, ECHO)
        with pytest.raises(queue.Empty):
            third.answer(timeout=1)
        first.close()
        assert third.answer().request_id == 1
        second.close()
        third.close()


def test_serve_raises_its_open_file_limit_and_keeps_connections_below_it():
    """At the connection limit grpc closes new connections as they arrive; at the open-file
    limit it could not accept them, nor the server open anything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit to raise the soft one to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_RESERVE + 100, hard))
    try:
        options = dict(_connection_options(Connections(max_connections=hard)))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert options["grpc.max_allowed_incoming_connections"] == hard - FD_RESERVE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    "flags", [["--max-calls", "0"], ["--max-streams", "-1"], ["--max-connections", str(1 << 31)], ["--idle-timeout", "0"], ["--keepalive", "nan"], ["--keepalive-timeout", "1e12"]]
)
def test_limits_outside_what_grpc_takes_are_refused_at_start(flags, capsys):
    with pytest.raises(SystemExit) as caught:
        hypervisor_main(["serve", "--insecure-no-admin-token", *flags])
    assert caught.value.code == 2 and f"{flags[0]} must be" in capsys.readouterr().err


def test_readme_states_the_connection_limits_of_the_code():
    section = README.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1].strip(): cells[2] for cells in (line.split("|") for line in section.splitlines()) if len(cells) > 3}
    defaults = Connections()
    for flag, value in (
        ("--max-connections", defaults.max_connections),
        ("--max-streams", defaults.max_streams),
        ("--max-calls", defaults.max_calls),
        ("--idle-timeout", defaults.idle_timeout_s),
        ("--keepalive", defaults.keepalive_s),
        ("--keepalive-timeout", defaults.keepalive_timeout_s),
    ):
        (limit,) = [limit for what, limit in rows.items() if f"(`{flag}`)" in what] or [""]
        assert f"{value:g}" in limit, f"README's Limits table should give {flag}: {value:g}"
