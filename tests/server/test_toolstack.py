"""The Toolstack's views of the model and its trace control."""

import threading

import grpc
import pytest

from hypervisor.core.trace import loads
from hypervisor.server.tracing import read_trace
from tests.support.server import start_server
from xensim.cli import main as xensim_main
from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import toolstack_pb2 as t

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(60)


def test_domains_are_listed_and_described_as_built(server):
    guest = WireGuest(server, nr_pages=512, nr_vcpus=3)
    other = WireGuest(server)
    listed = guest.toolstack("ListDomains", t.ListDomainsRequest()).domains
    assert [d.domid for d in listed] == sorted((guest.domid, other.domid))
    domain = guest.toolstack("DomainInfo", t.DomainInfoRequest(domid=guest.domid)).domain
    assert (domain.nr_pages, domain.tot_pages, domain.nr_vcpus, domain.online_vcpus) == (512, 512, 3, 1)  # shared info is Xen heap
    assert domain.max_evtchn_port == 1023 and not domain.paused and not domain.HasField("shutdown_reason")

    guest.call("SchedOp", h.SchedOpRequest(shutdown=h.SchedShutdown(reason=common_pb2.SHUTDOWN_REASON_CRASH)))
    assert guest.toolstack("DomainInfo", t.DomainInfoRequest(domid=guest.domid)).domain.shutdown_reason == common_pb2.SHUTDOWN_REASON_CRASH

    freed = guest.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=guest.domid)).freed_frames
    assert freed == 513
    assert [d.domid for d in guest.toolstack("ListDomains", t.ListDomainsRequest()).domains] == [other.domid]


def test_vcpu_info_and_event_channel_status_show_the_model(server):
    guest = WireGuest(server)
    port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_ipi=h.EvtchnBindIpi(vcpu=1))).port
    guest.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=port)))
    vcpus = guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid)).vcpus
    assert [(v.vcpu_id, v.online, v.kernel_cr3_mfn) for v in vcpus] == [(0, True, guest.start_info.pt_base_mfn), (1, False, 0)]
    assert vcpus[1].upcall_pending and not vcpus[0].upcall_pending and not vcpus[1].session_open

    (status,) = guest.toolstack("EventChannelStatus", t.EventChannelStatusRequest(domid=guest.domid)).ports
    assert (status.port, status.status.state, status.status.vcpu, status.pending, status.masked) == (port, common_pb2.EVTCHN_STAT_IPI, 1, True, False)

    with pytest.raises(grpc.RpcError) as caught:
        guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid, vcpu=5))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # ENOENT


def test_audit_is_clean_and_stats_count_each_outcome(server):
    guest = WireGuest(server)
    guest.call("XenVersion", h.XenVersionRequest())
    with pytest.raises(grpc.RpcError):
        guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, 1))
    assert not guest.toolstack("Audit", t.AuditRequest()).findings
    assert not guest.toolstack("Audit", t.AuditRequest(domid=guest.domid)).findings
    counts = {(c.op, c.errno): c.count for c in guest.toolstack("Stats", t.StatsRequest()).counts}
    assert counts[("xen_version", 0)] == 1 and counts[("create_domain", 0)] == 1
    assert counts[("mmuext_op", common_pb2.XEN_ERRNO_EINVAL)] == 1


def test_start_and_stop_trace_write_every_call_to_a_file(server, tmp_path):
    path = tmp_path / "run.trace"
    guest = WireGuest(server)
    guest.toolstack("StartTrace", t.StartTraceRequest(path=str(path)))
    other = WireGuest(server)
    other.pinned_table(1)
    with pytest.raises(grpc.RpcError):
        other.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, 1))
    lines = guest.toolstack("StopTrace", t.StopTraceRequest()).lines
    records = [record for _, record in read_trace(str(path))]
    assert records[1]["op"] == "create_domain" and "digest" in records[-1]
    assert lines == len(records) - 2  # between the header and the digest
    assert guest.toolstack("StopTrace", t.StopTraceRequest()).lines == 0  # none running


def test_trace_from_the_start_replays_exactly(tmp_path, capsys):
    path = tmp_path / "run.trace"
    with start_server("--trace", str(path)) as server:
        guest = WireGuest(server)
        guest.pinned_table(1)
        with pytest.raises(grpc.RpcError):
            guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, 1))
    assert xensim_main(["replay", str(path)]) == 0  # the server closed the trace with its digest at exit
    assert "0 mismatches, final state matches, 0 audit findings" in capsys.readouterr().out


def test_stream_trace_sends_each_call_as_it_runs(server):
    guest = WireGuest(server)
    stream = guest.ts.StreamTrace(t.StreamTraceRequest(), metadata=server.toolstack_metadata(), timeout=10)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(loads(next(stream).line) for _ in range(2)))
    reader.start()
    while reader.is_alive():  # calls until the stream is surely subscribed and has seen two
        guest.call("XenVersion", h.XenVersionRequest())
        reader.join(0.05)
    stream.cancel()
    assert [(r["caller"], r["op"]) for r in lines] == [([guest.domid, 0], "xen_version")] * 2
