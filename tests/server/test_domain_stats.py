"""Per-domain hypercall counts (Toolstack DomainStats, `xensim xl top`, `xl list`) are the
core's, so a trace replayed into a new core answers DomainStats as the live server did."""

import json

import grpc
import pytest

from hypervisor.core import views
from hypervisor.core.abi import Errno
from hypervisor.core.trace import replay
from hypervisor.server.tracing import open_trace
from tests.support.server import start_server
from xensim.cli import main as xensim_main
from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(90)


def live_counts(guest: WireGuest) -> list[tuple[int, str, str, int]]:
    counts = guest.toolstack("DomainStats", t.DomainStatsRequest()).counts
    return [(c.domid, c.op, Errno(c.errno).name if c.errno else "ok", c.count) for c in counts]


def test_a_replayed_trace_answers_domain_stats_as_the_live_server_did(tmp_path, capsys):
    path = tmp_path / "run.trace"
    with start_server("--trace", str(path)) as server:
        guest, gone = WireGuest(server), WireGuest(server)
        guest.call("XenVersion", h.XenVersionRequest())
        guest.call("Load", m.LoadRequest(va=guest.start_info.mfn_list, size=8), vcpu=0)
        _, l1 = guest.pinned_table(1)
        guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, l1))
        with pytest.raises(grpc.RpcError):
            guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, l1))  # no longer pinned: EINVAL
        unpin = h.MulticallEntry(mmuext_op=h.MmuextOpRequest(ops=[h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_UNPIN_TABLE, arg1=l1)]))
        guest.call("Multicall", h.MulticallRequest(entries=[unpin, h.MulticallEntry(xen_version=h.XenVersionRequest())]))
        gone.call("XenVersion", h.XenVersionRequest())
        gone.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=gone.domid))
        live = live_counts(guest)
        one = guest.toolstack("DomainStats", t.DomainStatsRequest(domid=guest.domid)).counts
        assert xensim_main(["xl", "list", "--json", "--server", server.address]) == 0
        (listed,) = json.loads(capsys.readouterr().out)
        guest.toolstack("StopTrace", t.StopTraceRequest())

    d = guest.domid
    assert (d, "mmuext_op", "EINVAL", 1) in live and (d, "multicall", "ok", 1) in live
    assert (d, "multicall/mmuext_op", "EINVAL", 1) in live  # a failed entry counts as its op's error, as in Stats
    assert all(domid == d for domid, *_ in live) and len(one) == len(live)  # the destroyed domain's counts went with it
    assert listed["hypercalls"] == sum(n for _, op, _, n in live if "/" not in op)  # a multicall's entries are not calls of their own
    with open_trace(str(path)) as stream:
        _, hv = replay(stream)
    assert views.domain_stats(hv) == live
    assert views.domain_stats(hv, gone.domid) == []
