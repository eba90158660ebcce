import pytest

from tests.support.server import secure_server, server  # noqa: F401

from .helpers import SessionClient, WireGuest


@pytest.fixture
def guest(server):  # noqa: F811 - pytest passes the fixture imported above
    """A fresh domain (2 vCPUs, vCPU 0 up) on the test's server."""
    return WireGuest(server)


@pytest.fixture
def vcpu0(guest):
    """vCPU 0's Session; the first message on it is the VcpuStarted push."""
    session = SessionClient(guest.hc, guest.md(0))
    yield session
    session.close()
