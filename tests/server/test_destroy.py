"""DestroyDomain is one step that is never left half done: the domain's tokens die and its
Sessions and calls end (ABORTED) before the core tears it down, teardown always completes, and a
bug of the simulator found on the way is INTERNAL, logged and counted, with the domain gone all
the same. Tokens name a domain instance, so a reused domid does not revive an old token.

A sound model gives no way to damage counts from the wire, so the tests that need a bug break
the core of an embedded server (tests/support/embedded.py) directly.
"""

import grpc
import pytest

from hypervisor.core.abi import DOMID_XEN
from hypervisor.server import errors
from hypervisor.server.auth import Tokens
from hypervisor.server.errors import Refused
from tests.support.embedded import embedded_server
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, WireGuest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def embedded():
    with embedded_server() as server:
        yield server


def _extra_reference(guest: WireGuest) -> int:
    """A bug of the simulator, as it could look: a general reference on one of the guest's
    frames that nobody holds. Returns the frame."""
    _, mfn = guest.alloc()
    assert guest.server.core(lambda hv: hv.frames.get_page(mfn, guest.domid))
    return mfn


def _destroy(guest: WireGuest) -> grpc.RpcError | None:
    try:
        guest.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=guest.domid))
    except grpc.RpcError as e:
        return e
    return None


def _refused(guest: WireGuest) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        guest.call("XenVersion", h.XenVersionRequest())
    return caught.value.code()


def test_destroy_that_finds_a_bug_is_internal_yet_ends_the_domain_its_token_and_sessions(embedded, caplog):
    victim, bystander = WireGuest(embedded), WireGuest(embedded)
    session = SessionClient(victim.hc, victim.md(0))
    session.push()  # VcpuStarted: the Session is open
    mfn = _extra_reference(victim)
    bugs = errors.internal_errors

    failed = _destroy(victim)

    assert failed is not None and failed.code() == grpc.StatusCode.INTERNAL, failed
    end = session.end()
    assert end is not None and end.code() == grpc.StatusCode.ABORTED, end
    assert _refused(victim) == grpc.StatusCode.UNAUTHENTICATED
    assert [d.domid for d in victim.toolstack("ListDomains", t.ListDomainsRequest()).domains] == [bystander.domid]
    assert errors.internal_errors == bugs + 1
    assert f"{mfn:#x}" in caplog.text and "quarantined" in caplog.text
    frame = victim.frame(mfn)
    assert (frame.owner, frame.quarantined, frame.count, frame.allocated) == (DOMID_XEN, True, 0, False)
    findings = [f.message for f in victim.toolstack("Audit", t.AuditRequest()).findings]
    assert len(findings) == 1 and f"mfn {mfn:#x} is quarantined" in findings[0], findings
    counts = victim.toolstack("Stats", t.StatsRequest()).counts
    assert [(c.errno, c.simulator_bug, c.count) for c in counts if c.op == "destroy_domain"] == [(0, True, 1)]
    assert bystander.call("XenVersion", h.XenVersionRequest()).major == 4  # the server keeps serving
    assert _destroy(bystander) is None


def test_an_old_token_cannot_act_as_a_new_domain_that_got_its_domid(embedded):
    old = WireGuest(embedded)
    _extra_reference(old)
    assert _destroy(old).code() == grpc.StatusCode.INTERNAL

    def wrap(hv):  # the domid counter after 32,751 more domains, made cheap
        hv._next_domid = old.domid

    embedded.core(wrap)
    new = WireGuest(embedded)
    assert new.domid == old.domid
    assert _refused(old) == grpc.StatusCode.UNAUTHENTICATED
    session = SessionClient(new.hc, old.md(0))
    assert session.end().code() == grpc.StatusCode.UNAUTHENTICATED
    assert new.call("XenVersion", h.XenVersionRequest()).major == 4


def test_a_token_names_a_domain_instance_not_a_domid():
    """Even a token that was never revoked: a domain with its domid but another instance is
    not the domain it was issued for."""

    class Domain:
        def __init__(self, instance):
            self.instance, self.vcpus = instance, [None]

    tokens = Tokens(None)
    token = tokens.issue(5, instance=1)
    metadata = (("authorization", f"Bearer {token}"), ("x-xen-vcpu", "0"))
    assert tokens.guest(metadata, {5: Domain(1)}) == (5, 0)
    for domains in ({5: Domain(2)}, {}):
        with pytest.raises(Refused) as caught:
            tokens.guest(metadata, domains)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
