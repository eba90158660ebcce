"""The server as a program: ready line, health, reflection, flags, signals, a taken port."""

import json
import os
import signal
import subprocess
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hypervisor.__main__ import main as hypervisor_main
from tests.support.server import TEST_FRAMES, start_server
from xensim.cli import main as xensim_main
from xensim.launch import run, server_command, started
from xensim.v1 import hypercalls_pb2, toolstack_pb2

from .helpers import SessionClient, WireGuest

pytestmark = pytest.mark.timeout(60)
SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "xensim.v1.Hypercalls", "xensim.v1.Toolstack"]


def test_health_is_serving_for_the_server_and_both_services(server):
    stub = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", "xensim.v1.Hypercalls", "xensim.v1.Toolstack"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def _reflect(server, **request):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)
    return response


def test_reflection_lists_every_service_and_serves_the_proto_comments(server):
    listed = _reflect(server, list_services="")
    assert sorted(s.name for s in listed.list_services_response.service) == SERVICES

    found = _reflect(server, file_containing_symbol="xensim.v1.Hypercalls.MmuUpdate")  # a method, by its service
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in found.file_descriptor_response.file_descriptor_proto]
    hypercalls = next(f for f in files if f.name == "xensim/v1/hypercalls.proto")
    comments = [loc.leading_comments for loc in hypercalls.source_code_info.location]
    assert any("HYPERVISOR_mmu_update (hypercall 1" in c for c in comments)
    assert {"xensim/v1/common.proto", "google/rpc/status.proto"} <= {f.name for f in files}  # its imports come along

    assert _reflect(server, file_containing_symbol="xensim.v1.NoSuchThing").HasField("error_response")


def test_ready_line_carries_the_admin_token_given_in_the_environment():
    env = {**os.environ, "XENSIM_ADMIN_TOKEN": "from-the-environment"}
    with started(server_command(), env=env, stop=signal.SIGTERM) as process:
        ready = json.loads(process.process.stdout.readline())
        assert ready["event"] == "ready" and ready["admin_token"] == "from-the-environment"
        assert ready["listen"].startswith("127.0.0.1:") and int(ready["listen"].rsplit(":", 1)[1]) > 0
        assert process.stop(signal.SIGTERM) == 0


SIGNALS = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


@SIGNALS
def test_a_signal_ends_open_and_sleeping_streams_with_unavailable_and_exits_cleanly(signum):
    with start_server() as server:
        guest = WireGuest(server)
        sleeper = SessionClient(guest.hc, guest.md(0))
        assert sleeper.push().HasField("started")
        sleeper.send(1, hypercalls_pb2.Call(sched_op=hypercalls_pb2.SchedOpRequest(block=hypercalls_pb2.SchedBlock())))
        idle = SessionClient(guest.hc, guest.md(1))
        deadline = time.monotonic() + 10
        while not guest.toolstack("VcpuInfo", toolstack_pb2.VcpuInfoRequest(domid=guest.domid, vcpu=0)).vcpus[0].blocked:
            assert time.monotonic() < deadline, "vCPU 0 never blocked"
            time.sleep(0.02)
        server.process.send_signal(signum)
        for session in (sleeper, idle):
            end = session.end()
            assert end.code() == grpc.StatusCode.UNAVAILABLE and "server shutting down" in end.details()
        assert server.process.wait(10) == 0


@SIGNALS
def test_a_signal_while_streams_are_busy_ends_each_with_unavailable_and_logs_no_error(signum):
    # The answers queued behind the signal drain one session after another (this test reads
    # them in turn), which took more than the default 3 s of grace on a loaded machine, and
    # grpc then cancels what is left (CANCELLED): a grace that covers the drain keeps the test
    # about the server's ending, not the machine's speed.
    with start_server("--grace", "60") as server:  # start_server fails the test if the server logged an error
        guest = WireGuest(server, nr_vcpus=4)
        sessions = [SessionClient(guest.hc, guest.md(v)) for v in range(4)]
        echo = hypercalls_pb2.Call(echo=hypercalls_pb2.EchoRequest(payload=bytes(4096)))
        for request_id in range(1, 200):  # answers are being written when the signal comes
            for session in sessions:
                session.send(request_id, *[echo] * 16)
        server.process.send_signal(signum)
        for session in sessions:
            end = session.end()
            assert end.code() == grpc.StatusCode.UNAVAILABLE, end
        assert server.process.wait(10) == 0


def test_a_second_server_on_a_taken_port_fails_loudly(server):
    second = run(server_command("--insecure-no-admin-token", listen=server.address), timeout=20)
    assert second.returncode != 0 and not second.stdout
    assert f"cannot listen on {server.address}" in second.stderr
    assert WireGuest(server).domid  # the first one still serves


@pytest.mark.parametrize("main", [hypervisor_main, lambda argv: xensim_main(argv)], ids=["python -m hypervisor", "xensim"])
def test_no_admin_token_is_refused_unless_listening_on_loopback(main, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--listen", "0.0.0.0:0", "--insecure-no-admin-token", "--frames", str(TEST_FRAMES)])
    assert caught.value.code == 2
    assert "--insecure-no-admin-token is refused on 0.0.0.0" in capsys.readouterr().err


def test_tls_serves_with_the_given_certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    with start_server("--tls-cert", str(cert), "--tls-key", str(key)) as server:
        channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(cert.read_bytes()))
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()

