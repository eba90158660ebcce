"""Whatever bytes and metadata arrive, the server answers with a status and keeps serving:
undecodable requests and absurd vCPU ids are INVALID_ARGUMENT, never a bug of the simulator
(UNKNOWN or INTERNAL, which also make `serve` exit 1)."""

from types import SimpleNamespace

import grpc
import pytest

from hypervisor.__main__ import main as hypervisor_main
from hypervisor.server.auth import Tokens
from hypervisor.server.errors import Refused
from xensim.v1 import hypercalls_pb2, toolstack_pb2

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(60)

GARBAGE = b"\xff\xff\xff"  # a field tag whose varint never ends: no message type parses it
METHODS = [
    (service.full_name, method)
    for module, name in ((hypercalls_pb2, "Hypercalls"), (toolstack_pb2, "Toolstack"))
    for service in (module.DESCRIPTOR.services_by_name[name],)
    for method in service.methods
]


def _identity(raw: bytes) -> bytes:
    return raw


def _raw_call(channel: grpc.Channel, service: str, method, requests: list[bytes], metadata=()):
    """Send these bytes as the method's request(s), read everything back; the status code."""
    path = f"/{service}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream, (True, True): channel.stream_stream}
    rpc = kind[method.client_streaming, method.server_streaming](path, request_serializer=_identity, response_deserializer=_identity)
    try:
        call = rpc(iter(requests) if method.client_streaming else requests[0], metadata=metadata, timeout=10)
        if method.server_streaming:
            list(call)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def _stopped_cleanly(server) -> None:
    status = server.stop()
    log = server.stderr()
    assert status == 0 and "INTERNAL" not in log and "Traceback" not in log, log


def test_undecodable_bytes_to_any_method_are_invalid_argument_before_authentication(secure_server):
    """Unary methods parse before they authenticate (no token sent, yet INVALID_ARGUMENT); a
    Session authenticates when it opens, then a message that does not parse ends it."""
    guest = WireGuest(secure_server)
    channel = secure_server.channel()
    answers = {}
    for service, method in METHODS:
        metadata = guest.md(0) if method.client_streaming else ()
        answers[method.name] = _raw_call(channel, service, method, [GARBAGE], metadata)
    # After a message that did run, too: the stream ends, the server goes on.
    echo = hypercalls_pb2.SessionRequest(request_id=1, calls=[hypercalls_pb2.Call(echo=hypercalls_pb2.EchoRequest())])
    session = next(method for _, method in METHODS if method.name == "Session")
    answers["Session after a good message"] = _raw_call(channel, "xensim.v1.Hypercalls", session, [echo.SerializeToString(), GARBAGE], guest.md(1))
    # A string field that is not UTF-8 is undecodable as well (protobuf's own rule).
    create = next(method for _, method in METHODS if method.name == "CreateDomain")
    answers["CreateDomain, name not UTF-8"] = _raw_call(channel, "xensim.v1.Toolstack", create, [b"\x1a\x02\xff\xfe"])
    assert {name: code for name, (code, _) in answers.items() if code != grpc.StatusCode.INVALID_ARGUMENT} == {}, answers
    assert all("Error parsing message" in details for _, details in answers.values()), answers
    assert guest.call("XenVersion", hypercalls_pb2.XenVersionRequest()).major  # still serving
    _stopped_cleanly(secure_server)


@pytest.mark.parametrize("vcpu", ["9" * 4301, "0" * 5000, "1" + "0" * 4400], ids=["4301 nines", "5000 zeros", "4401 digits"])
def test_a_vcpu_id_of_thousands_of_digits_is_invalid_argument(server, vcpu):
    guest = WireGuest(server)
    metadata = (("authorization", f"Bearer {guest.token}"), ("x-xen-vcpu", vcpu))
    with pytest.raises(grpc.RpcError) as unary:
        guest.hc.XenVersion(hypercalls_pb2.XenVersionRequest(), metadata=metadata, timeout=10)
    with pytest.raises(grpc.RpcError) as session:
        list(guest.hc.Session(iter(()), metadata=metadata, timeout=10))
    for caught in (unary, session):
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "is not a vCPU of" in caught.value.details()
    _stopped_cleanly(server)


@pytest.mark.parametrize("vcpu", ["\u0663", "\uff11"], ids=["arabic-indic 3", "fullwidth 1"])
def test_a_vcpu_id_is_ascii_decimal_digits_only(vcpu):
    """grpc hands the server UTF-8 metadata as str, and int() reads any Unicode digit: '\u0663'
    was vCPU 3. Only what a client writes with str(id) names a vCPU."""
    tokens = Tokens(None)
    token = tokens.issue(1, instance=1)
    domain = SimpleNamespace(instance=1, vcpus=[None] * 32)
    with pytest.raises(Refused) as caught:
        tokens.guest((("authorization", f"Bearer {token}"), ("x-xen-vcpu", vcpu)), {1: domain})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("port", ["\u0663", "9" * 5000], ids=["arabic-indic 3", "5000 digits"])
def test_a_listen_port_is_ascii_decimal_digits_only(port, capsys):
    with pytest.raises(SystemExit) as caught:
        hypervisor_main(["serve", "--listen", f"127.0.0.1:{port}", "--insecure-no-admin-token"])
    assert caught.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
