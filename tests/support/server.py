"""A real hypervisor server in a subprocess, for tests of the server and of guests.

`start_server()` runs the server as the programs do (xensim.launch.hypervisor_server: a free
loopback port, stopped with SIGTERM at the end) and adds what a test needs on top: it fails
the test if the server did not stop on SIGTERM, did not exit 0, or logged a traceback or an
INTERNAL error, since a bug of the simulator must never pass unnoticed. The fixtures
`server` (no admin token) and `secure_server` (with one) wrap it; import them into a
conftest.py to use them:

    from tests.support.server import secure_server, server  # noqa: F401

The object they yield has `.address`, `.admin_token`, `.stderr()`, channel and stub helpers
and the metadata a call needs (`toolstack_metadata()`, `guest_metadata(token, vcpu)`).
"""

import secrets
import sys
from contextlib import contextmanager

import grpc
import pytest

from xensim.launch import STOP_TIMEOUT, Server, hypervisor_server
from xensim.v1 import hypercalls_pb2_grpc, toolstack_pb2, toolstack_pb2_grpc

TEST_FRAMES = 1 << 16  # 256 MiB of machine memory: room for many small domains, fast to start
BAD_SIGNS = ("Traceback", "INTERNAL")


class ServerClient:
    """A server as tests call it: channels and stubs that close with it, metadata."""

    def __init__(self, address: str):
        self.address = address
        self._channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        """A new sync channel to the server, closed when the server stops."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def hypercalls(self, channel: grpc.Channel | None = None) -> hypercalls_pb2_grpc.HypercallsStub:
        return hypercalls_pb2_grpc.HypercallsStub(channel or self.channel())

    def toolstack(self, channel: grpc.Channel | None = None) -> toolstack_pb2_grpc.ToolstackStub:
        return toolstack_pb2_grpc.ToolstackStub(channel or self.channel())

    def toolstack_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a Toolstack call carries: nothing, to a server without an admin token."""
        return ()

    @staticmethod
    def guest_metadata(token: str, vcpu: int) -> tuple[tuple[str, str], ...]:
        """What a Hypercalls call of vCPU `vcpu` of the domain with `token` carries."""
        return (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))

    def create_domain(self, nr_pages: int = 2048, nr_vcpus: int = 2, **kw) -> toolstack_pb2.CreateDomainResponse:
        """CreateDomain through the Toolstack service (the response has domid, token, start_info)."""
        request = toolstack_pb2.CreateDomainRequest(nr_pages=nr_pages, nr_vcpus=nr_vcpus, **kw)
        return self.toolstack().CreateDomain(request, metadata=self.toolstack_metadata(), timeout=10)

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


class ServerProcess(ServerClient):
    """A running server process as tests use it."""

    def __init__(self, launched: Server):
        super().__init__(launched.address)
        self.launched = launched
        self.process = launched.process
        self.admin_token: str | None = launched.admin_token
        self.ready = launched.ready

    def toolstack_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a Toolstack call carries: the admin token, or nothing without one."""
        return self.launched.metadata()

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.launched.log()

    def stop(self) -> int:
        """Close the channels, stop the server; returns its exit status."""
        self.close_channels()
        return self.launched.stop()


@contextmanager
def start_server(*args: str, admin_token: str | None = None, frames: int = TEST_FRAMES, listen: str = "127.0.0.1:0", check: bool = True):
    """Run a server for the block; `args` are extra `serve` flags. With `check` (the default)
    the block fails if the server logged an internal error or did not exit cleanly."""
    with hypervisor_server(*args, frames=frames, admin_token=admin_token, listen=listen) as launched:
        server = ServerProcess(launched)
        try:
            yield server
        except BaseException:
            print(f"--- server stderr ---\n{server.stderr()}", file=sys.stderr)  # shown with the failure
            raise
        finally:
            status = server.stop()
    if launched.killed:
        pytest.fail(f"the server did not stop within {STOP_TIMEOUT} s of SIGTERM:\n{server.stderr()}")
    if check:
        if any(sign in server.stderr() for sign in BAD_SIGNS):
            pytest.fail(f"the server logged an internal error:\n{server.stderr()}")
        assert status == 0, f"the server exited with {status}:\n{server.stderr()}"


@pytest.fixture
def server():
    """A server on a free loopback port, without an admin token (Toolstack calls need no
    metadata)."""
    with start_server() as running:
        yield running


@pytest.fixture
def secure_server():
    """A server on a free loopback port that requires the admin token in `.admin_token`."""
    with start_server(admin_token=secrets.token_hex(16)) as running:
        yield running
