"""A real hypervisor server in a subprocess, for tests of the server and of guests.

`start_server()` runs `python -m hypervisor serve --listen 127.0.0.1:0 ...`, waits (10 s at
most) for its ready line, and on exit stops it with SIGTERM (killing it if it does not stop
in time) and fails the test if its stderr shows a traceback or an INTERNAL error: a bug of the
simulator must never pass unnoticed. The fixtures `server` (no admin token) and
`secure_server` (with one) wrap it; import them into a conftest.py to use them:

    from tests.support.server import secure_server, server  # noqa: F401

The object they yield has `.address`, `.admin_token`, `.stderr()`, channel and stub helpers
and the metadata a call needs (`toolstack_metadata()`, `guest_metadata(token, vcpu)`).
"""

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import grpc
import pytest

from xensim.v1 import hypercalls_pb2_grpc, toolstack_pb2, toolstack_pb2_grpc

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
TEST_FRAMES = 1 << 16  # 256 MiB of machine memory: room for many small domains, fast to start
BAD_SIGNS = ("Traceback", "INTERNAL")


class ServerProcess:
    """A running server: where it listens, how to call it, what it logged."""

    def __init__(self, process: subprocess.Popen, ready: dict, stderr_path: str):
        self.process = process
        self.address: str = ready["listen"]
        self.admin_token: str | None = ready["admin_token"]
        self.ready = ready
        self._stderr_path = stderr_path
        self._channels: list[grpc.Channel] = []

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        with open(self._stderr_path, errors="replace") as f:
            return f.read()

    # -- calling it ---------------------------------------------------------------------------

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
        """What a Toolstack call carries: the admin token, or nothing without one."""
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    @staticmethod
    def guest_metadata(token: str, vcpu: int) -> tuple[tuple[str, str], ...]:
        """What a Hypercalls call of vCPU `vcpu` of the domain with `token` carries."""
        return (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))

    def create_domain(self, nr_pages: int = 2048, nr_vcpus: int = 2, **kw) -> toolstack_pb2.CreateDomainResponse:
        """CreateDomain through the Toolstack service (the response has domid, token, start_info)."""
        request = toolstack_pb2.CreateDomainRequest(nr_pages=nr_pages, nr_vcpus=nr_vcpus, **kw)
        return self.toolstack().CreateDomain(request, metadata=self.toolstack_metadata(), timeout=10)

    # -- stopping it --------------------------------------------------------------------------

    def stop(self) -> int:
        """SIGTERM, wait, kill if needed; returns the exit status."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"the server did not stop within {STOP_TIMEOUT} s of SIGTERM:\n{self.stderr()}")
        if self.process.stdout:
            self.process.stdout.close()
        return self.process.returncode

    def check_stderr(self) -> None:
        """Fail if the server logged a traceback or an INTERNAL error."""
        text = self.stderr()
        if any(sign in text for sign in BAD_SIGNS):
            pytest.fail(f"the server logged an internal error:\n{text}")


def server_command(*args: str, frames: int = TEST_FRAMES, listen: str = "127.0.0.1:0") -> list[str]:
    return [sys.executable, "-m", "hypervisor", "serve", "--listen", listen, "--frames", str(frames), *args]


def _read_ready_line(process: subprocess.Popen, stderr_path: str) -> dict:
    """The first stdout line, within READY_TIMEOUT, parsed; fail with the server's stderr."""
    deadline = time.monotonic() + READY_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                process.kill()
                process.wait()
                pytest.fail(f"no ready line within {READY_TIMEOUT} s:\n{open(stderr_path).read()}")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                process.wait()
                pytest.fail(f"the server exited ({process.returncode}) before its ready line:\n{open(stderr_path).read()}")
            buffer += chunk
    ready = json.loads(buffer.split(b"\n", 1)[0])
    assert ready["event"] == "ready", ready
    return ready


@contextmanager
def start_server(*args: str, admin_token: str | None = None, frames: int = TEST_FRAMES, listen: str = "127.0.0.1:0", check: bool = True):
    """Run a server for the block. Without `admin_token` it runs with
    --insecure-no-admin-token; `args` are extra `serve` flags. With `check` (the default) the
    block fails if the server logged an internal error or did not exit cleanly."""
    auth = ["--admin-token", admin_token] if admin_token else ["--insecure-no-admin-token"]
    with tempfile.NamedTemporaryFile(prefix="xensim-server-", suffix=".stderr", delete=False) as err:
        stderr_path = err.name
    try:
        with open(stderr_path, "wb") as err:
            process = subprocess.Popen(server_command(*auth, *args, frames=frames, listen=listen), stdout=subprocess.PIPE, stderr=err)
        server = ServerProcess(process, _read_ready_line(process, stderr_path), stderr_path)
        try:
            yield server
        except BaseException:
            print(f"--- server stderr ---\n{server.stderr()}", file=sys.stderr)  # shown with the failure
            raise
        finally:
            status = server.stop()
        if check:
            server.check_stderr()
            assert status == 0, f"the server exited with {status}:\n{server.stderr()}"
    finally:
        os.unlink(stderr_path)


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
