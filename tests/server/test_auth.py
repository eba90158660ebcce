"""Who may call what: a domain token acts as its own domain only, a vCPU id must name one of
its vCPUs, the Toolstack needs the admin token; every refused call changes nothing."""

import grpc
import pytest

from xensim.v1 import common_pb2, hypercalls_pb2, toolstack_pb2

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(60)


def _state(guest: WireGuest, mfn: int):
    """What a refused call must leave alone: the frame, every domain, and a clean audit."""
    return (
        guest.frame(mfn),
        guest.toolstack("ListDomains", toolstack_pb2.ListDomainsRequest()),
        guest.toolstack("Audit", toolstack_pb2.AuditRequest()),
    )


def _unpin(l4: int) -> hypercalls_pb2.MmuextOpRequest:
    return hypercalls_pb2.MmuextOpRequest(ops=[hypercalls_pb2.MmuextOp(cmd=common_pb2.MMUEXT_CMD_UNPIN_TABLE, arg1=l4)])


@pytest.mark.parametrize(
    "metadata, code",
    [
        pytest.param(lambda a, b: (("x-xen-vcpu", "0"),), grpc.StatusCode.UNAUTHENTICATED, id="no token"),
        pytest.param(lambda a, b: (("authorization", "Bearer not-a-token"), ("x-xen-vcpu", "0")), grpc.StatusCode.UNAUTHENTICATED, id="wrong token"),
        pytest.param(lambda a, b: (("authorization", f"Basic {a.token}"), ("x-xen-vcpu", "0")), grpc.StatusCode.UNAUTHENTICATED, id="not bearer"),
        pytest.param(lambda a, b: b.md(0), grpc.StatusCode.FAILED_PRECONDITION, id="another domain's token"),
        pytest.param(lambda a, b: (("authorization", f"Bearer {a.token}"),), grpc.StatusCode.INVALID_ARGUMENT, id="no vcpu"),
        pytest.param(lambda a, b: a.md(2), grpc.StatusCode.INVALID_ARGUMENT, id="vcpu beyond nr_vcpus"),
        pytest.param(lambda a, b: (("authorization", f"Bearer {a.token}"), ("x-xen-vcpu", "-1")), grpc.StatusCode.INVALID_ARGUMENT, id="vcpu not decimal"),
    ],
)
def test_hypercall_without_the_domains_own_credentials_is_refused_and_changes_nothing(server, metadata, code):
    a, b = WireGuest(server), WireGuest(server)
    l4 = a.start_info.pt_base_mfn  # a's boot L4, pinned by the builder
    before = _state(a, l4)
    with pytest.raises(grpc.RpcError) as caught:
        a.hc.MmuextOp(_unpin(l4), metadata=metadata(a, b), timeout=10)
    # Another domain's token is that domain calling: Xen itself refuses to unpin a's frame.
    assert caught.value.code() == code, caught.value.details()
    assert _state(a, l4) == before
    assert a.frame(l4).pinned


def test_a_destroyed_domains_token_is_refused(server):
    guest = WireGuest(server)
    guest.toolstack("DestroyDomain", toolstack_pb2.DestroyDomainRequest(domid=guest.domid))
    with pytest.raises(grpc.RpcError) as caught:
        guest.call("XenVersion", hypercalls_pb2.XenVersionRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "metadata, code",
    [
        pytest.param(lambda s, g: (), grpc.StatusCode.UNAUTHENTICATED, id="no token"),
        pytest.param(lambda s, g: (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED, id="wrong token"),
        pytest.param(lambda s, g: (("authorization", f"Bearer {g.token}"),), grpc.StatusCode.PERMISSION_DENIED, id="domain token"),
    ],
)
def test_toolstack_without_the_admin_token_is_refused_and_changes_nothing(secure_server, metadata, code):
    guest = WireGuest(secure_server)
    before = _state(guest, guest.start_info.pt_base_mfn)
    for rpc, request in (
        ("DestroyDomain", toolstack_pb2.DestroyDomainRequest(domid=guest.domid)),
        ("CreateDomain", toolstack_pb2.CreateDomainRequest(nr_pages=64, nr_vcpus=1)),
        ("ListDomains", toolstack_pb2.ListDomainsRequest()),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            getattr(guest.ts, rpc)(request, metadata=metadata(secure_server, guest), timeout=10)
        assert caught.value.code() == code, (rpc, caught.value.details())
    assert _state(guest, guest.start_info.pt_base_mfn) == before


def test_a_domain_token_cannot_use_the_toolstack_even_without_an_admin_token(server):
    guest = WireGuest(server)
    with pytest.raises(grpc.RpcError) as caught:
        guest.ts.ListDomains(toolstack_pb2.ListDomainsRequest(), metadata=(("authorization", f"Bearer {guest.token}"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_session_checks_credentials_when_it_opens(server):
    guest = WireGuest(server)
    call = guest.hc.Session(iter(()), metadata=(("authorization", "Bearer nope"), ("x-xen-vcpu", "0")), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
