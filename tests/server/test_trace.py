"""File traces over a real server: a trace never fails a call nor holds the event loop, it
reaches the disk in whole records while the server runs, and any trace replays, whether the
server was killed, the disk filled up or the trace started mid-run.
"""

import asyncio
import os
import resource
import subprocess
import time

import grpc
import pytest

from hypervisor.core import Hypervisor
from hypervisor.core.trace import replay
from hypervisor.server.tracing import Tracing, open_trace
from tests.core.guest import Guest
from tests.support.server import start_server
from xensim.cli import main as xensim_main
from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, WireGuest

pytestmark = pytest.mark.timeout(90)


def replayed_calls(path) -> int:
    """How many calls the trace file holds so far, read as a replay reads it."""
    with open_trace(str(path)) as stream:
        report, _ = replay(stream)
    return report.calls


def test_start_trace_to_a_fifo_is_refused_at_once_and_calls_go_on(server, tmp_path):
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    guest = WireGuest(server)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            guest.toolstack("StartTrace", t.StartTraceRequest(path=str(fifo)))
        assert time.monotonic() - started < 5
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(fifo) in caught.value.details() and "is a FIFO, not a regular file" in caught.value.details()
        guest.call("XenVersion", h.XenVersionRequest())
        assert guest.toolstack("StopTrace", t.StopTraceRequest()).lines == 0  # nothing was started
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # frees a server stuck in open(), as the old one was


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills up after a few dozen trace records."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_the_trace_and_every_call_keeps_its_result(tiny_disk, tmp_path, capsys):
    path = tiny_disk / "run.trace"
    with start_server("--trace", str(path)) as server:  # exits 0 and logs no INTERNAL error
        guest = WireGuest(server)
        pfn, _ = guest.alloc()
        for i in range(300):  # each record holds 1 KiB: the disk fills at the first flush, after ~60
            assert not guest.call("Write", m.WriteRequest(va=guest.direct_va(pfn), data=bytes([i % 251]) * 1024)).HasField("fault")
        assert guest.call("Read", m.ReadRequest(va=guest.direct_va(pfn), length=1024)).data == bytes([299 % 251]) * 1024

        broken = guest.toolstack("Stats", t.StatsRequest()).trace_error
        assert str(path) in broken and "No space left on device" in broken
        stopped = guest.toolstack("StopTrace", t.StopTraceRequest())
        assert 0 < stopped.lines < 300 and stopped.write_error == broken
        assert guest.toolstack("StopTrace", t.StopTraceRequest()) == t.StopTraceResponse()  # reported once, then none runs
        assert not guest.toolstack("Stats", t.StatsRequest()).trace_error

        again = tmp_path / "again.trace"  # a disk with room: tracing works again
        guest.toolstack("StartTrace", t.StartTraceRequest(path=str(again)))
        guest.call("XenVersion", h.XenVersionRequest())
        assert guest.toolstack("StopTrace", t.StopTraceRequest()) == t.StopTraceResponse(lines=1)
    # one clear line in the log (besides the Toolstack call log, which names StopTrace's answer)
    assert len([line for line in server.stderr().splitlines() if "No space left on device" in line and "Toolstack " not in line]) == 1

    assert xensim_main(["replay", str(path)]) == 0  # what reached the disk is a prefix of the run
    assert "replayed as a prefix" in capsys.readouterr().out


def test_a_write_error_in_the_tracing_layer_leaves_the_call_alone(tmp_path):
    """The same rule without a server: a file that may not grow (RLIMIT_FSIZE, EFBIG) under a
    Tracing whose core runs 300 writes; none raises and the trace stops at the first error."""
    path = tmp_path / "run.trace"

    async def run() -> tuple[bytes, tuple[int, str]]:
        hv = Hypervisor(nr_frames=1 << 13)
        tracing = Tracing(hv)
        tracing.start_file(str(path))
        guest = Guest(hv)
        pfn, _ = guest.alloc()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, hard))
        try:
            for i in range(300):
                hv.hypercall(guest.domid, 0, "write", va=guest.direct_va(pfn), data=bytes([i % 251]) * 1024)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        return hv.memory.read(guest.mfn(pfn), 0, 1024), tracing.stop_file()

    contents, (lines, error) = asyncio.run(run())
    assert contents == bytes([299 % 251]) * 1024
    assert 0 < lines < 300 and str(path) in error and "File too large" in error
    assert 0 < replayed_calls(path) <= lines


def test_a_killed_servers_gz_trace_replays_as_a_prefix(tmp_path, capsys):
    path = tmp_path / "run.trace.gz"
    with start_server("--trace", str(path), check=False) as server:
        guest = WireGuest(server)
        session = SessionClient(guest.hc, guest.md(0))
        for request_id in range(1, 4):  # 3,000 calls, then a few: the last ones wait for the timer
            session.send(request_id, *[h.Call(xen_version=h.XenVersionRequest())] * 1000)
            session.answer()
        session.close()
        guest.call("XenVersion", h.XenVersionRequest())
        made = 1 + 3000 + 1  # create_domain and the calls
        deadline = time.monotonic() + 10
        while replayed_calls(path) < made:
            assert time.monotonic() < deadline, f"{replayed_calls(path)} of {made} calls reached the disk"
            time.sleep(0.1)
        server.process.kill()
        server.process.wait()

    assert xensim_main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"replayed {made} calls: 0 mismatches" in out
    assert "the trace ends without its end record: replayed as a prefix, final state not compared" in out


def test_a_trace_started_mid_run_replays_from_its_snapshot(tmp_path, capsys):
    path = tmp_path / "mid.trace"
    with start_server() as server:
        guest, other = WireGuest(server), WireGuest(server)
        _, l1 = guest.pinned_table(1)
        port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=1))).port
        pfn, _ = guest.alloc()
        guest.call("Write", m.WriteRequest(va=guest.direct_va(pfn), data=b"before the trace"))

        guest.toolstack("StartTrace", t.StartTraceRequest(path=str(path)))
        assert guest.call("Read", m.ReadRequest(va=guest.direct_va(pfn), length=16)).data == b"before the trace"
        guest.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=port)))
        guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, l1))
        with pytest.raises(grpc.RpcError):
            guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, l1))  # no longer pinned: EINVAL, recorded as such
        other.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=other.domid))
        WireGuest(server)  # a new domain gets the next domid, as in the run
        lines = guest.toolstack("StopTrace", t.StopTraceRequest()).lines

    assert xensim_main(["replay", str(path)]) == 0
    assert f"replayed {lines} calls from a snapshot of the running machine: 0 mismatches, final state matches, 0 audit findings" in capsys.readouterr().out


def test_a_trace_of_a_run_that_kicked_vcpus_replays_to_the_same_state(tmp_path, capsys):
    """The kicks a call leaves for the server, which it takes between calls untraced, are not
    part of the state a replay compares."""
    path = tmp_path / "run.trace"
    with start_server("--trace", str(path)) as server:
        guest = WireGuest(server)
        port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=1))).port
        guest.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=port)))  # kicks vCPU 1
    assert xensim_main(["replay", str(path)]) == 0
    assert "3 calls: 0 mismatches, final state matches" in capsys.readouterr().out
