"""Malformed input never reaches Xen: INVALID_ARGUMENT with a BadRequest naming the field,
and no `xen` ErrorInfo; nothing of the call or message runs."""

import grpc
import pytest

from hypervisor.core.abi import MAX_BATCH
from xensim.v1 import common_pb2, toolstack_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m

from .helpers import SessionClient, WireGuest, field_violation, status_of

pytestmark = pytest.mark.timeout(60)

NOP = h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_TLB_FLUSH_LOCAL)

ROWS = [
    ("MmuextOp", h.MmuextOpRequest(ops=[NOP, h.MmuextOp(cmd=0)]), "ops[1].cmd"),
    ("MmuextOp", h.MmuextOpRequest(ops=[NOP] * (MAX_BATCH + 1)), "ops"),
    ("MmuUpdate", h.MmuUpdateRequest(reqs=[h.MmuUpdate()] * (MAX_BATCH + 1)), "reqs"),
    ("Multicall", h.MulticallRequest(entries=[h.MulticallEntry()]), "entries[0].call"),
    ("Multicall", h.MulticallRequest(entries=[h.MulticallEntry(mmuext_op=h.MmuextOpRequest(ops=[h.MmuextOp()]))]), "entries[0].mmuext_op.ops[0].cmd"),
    ("EventChannelOp", h.EventChannelOpRequest(), "op"),
    ("SchedOp", h.SchedOpRequest(shutdown=h.SchedShutdown(reason=0)), "shutdown.reason"),
    ("Load", m.LoadRequest(va=0x1000, size=3), "size"),
    ("Load", m.LoadRequest(va=0x1004, size=8), "va"),
    ("Store", m.StoreRequest(va=0x1000, size=1, value=0x100), "value"),
    ("Atomic", m.AtomicRequest(op=9, va=0x1000, size=8), "op"),
    ("Read", m.ReadRequest(va=0x1ff0, length=32), "length"),
    ("Write", m.WriteRequest(va=0x1000, data=b""), "data"),
]


@pytest.mark.parametrize("rpc, request_, field", ROWS, ids=[f"{r[0]}:{r[2]}" for r in ROWS])
def test_malformed_unary_call_is_invalid_argument_naming_the_field(server, rpc, request_, field):
    guest = WireGuest(server)
    stats = guest.toolstack("Stats", toolstack_pb2.StatsRequest())
    with pytest.raises(grpc.RpcError) as caught:
        guest.call(rpc, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = field_violation(status_of(caught.value))
    assert violation.field == field and violation.description
    assert caught.value.details().startswith(f"{field}: ")
    assert guest.toolstack("Stats", toolstack_pb2.StatsRequest()) == stats  # the core never saw it


def test_frame_info_beyond_4096_frames_is_invalid_argument(server):
    guest = WireGuest(server)
    with pytest.raises(grpc.RpcError) as caught:
        guest.toolstack("FrameInfo", toolstack_pb2.FrameInfoRequest(mfn=0, count=4097))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violation(status_of(caught.value)).field == "count"


def test_session_message_with_too_many_calls_is_rejected_whole_and_the_stream_goes_on(server):
    guest = WireGuest(server)
    session = SessionClient(guest.hc, guest.md(0))
    echo = h.Call(echo=h.EchoRequest(payload=b"x"))
    session.send(1, *[echo] * 1025)
    rejected = session.answer()
    assert rejected.request_id == 1 and not rejected.results
    assert rejected.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field_violation(rejected.status).field == "calls"

    session.send(2, h.Call(load=m.LoadRequest(va=8, size=5)), echo)
    answer = session.answer()
    assert field_violation(answer.results[0].status).field == "calls[0].load.size"
    assert answer.results[1].echo.payload == b"x"
    session.close()


def test_session_request_id_zero_ends_the_stream_with_invalid_argument(server):
    guest = WireGuest(server)
    session = SessionClient(guest.hc, guest.md(0))
    session.send(0, h.Call(echo=h.EchoRequest()))
    end = session.end()
    assert end.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in end.details()
